"""Stopping a stage whose training diverged: a non-finite loss, gradient norm or weight stops it at the step it
happens, before the optimiser applies it where that can be seen, and always before a checkpoint or final/ is
written, so the newest complete checkpoint stays the last good one and no NaN weights are ever saved.

The HF trainers are watched by `NonFiniteGuard` (pipeline.callbacks), PPO's loop calls `check_step` itself.
"""

from __future__ import annotations

import math

import torch

from pipeline.errors import PipelineError


class NonFiniteError(PipelineError):
    """Training produced NaN or Inf; the message names the stage, the step, what and the value."""

    def __init__(self, stage: str, step: int, what: str, value: float):
        self.step, self.what, self.value = step, what, value
        super().__init__(
            f"{stage}: training stopped at step {step}: the {what} is {value} (not finite). Nothing from this step "
            f"was saved; the newest complete checkpoint is the last good one. Lower the learning rate, check the data, "
            f"or train in float32 or bfloat16 rather than float16, then run again (with --fresh if you change the "
            f"config)")


def is_finite(value) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all `tensors` together, computed in float32 (NaN or Inf when any element is)."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors])))


def first_non_finite(parameters) -> tuple[str, float] | None:
    """(name, value) of the first parameter (name, tensor) holding a NaN or Inf, or None. Element-wise rather than a
    norm: the norm of large float16 weights can overflow while every weight is finite."""
    for name, parameter in parameters:
        bad = ~torch.isfinite(parameter.detach())
        if bad.any():
            return name, float(parameter.detach()[bad][0])
    return None


def check_step(stage: str, step: int, loss=None, grad_norm=None) -> None:
    """Raise NonFiniteError when the loss or the gradient norm of step `step` is not finite."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not is_finite(value):
            raise NonFiniteError(stage, step, what, float(value))


def check_weights(stage: str, step: int, named_parameters) -> None:
    """Raise NonFiniteError when an update left a trainable weight NaN or Inf (a finite gradient times a huge
    learning rate does that without any loss going non-finite first)."""
    found = first_non_finite(named_parameters)
    if found is not None:
        raise NonFiniteError(stage, step, f"weight {found[0]} after the optimiser step", found[1])
