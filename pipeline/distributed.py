"""What code running in several processes needs, in one place below the stages (OpenRLHF keeps the same in one
strategy object): which process is the main one, letting it go first, the DeepSpeed plugin for code that drives
accelerate itself, and gathering ZeRO-3 parameters. Starting the processes is pipeline/launch.py's job.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pipeline.config import DistributedConfig


def is_main_process() -> bool:
    """Process 0 of all machines. torchrun (under accelerate launch) sets RANK in every process before any Python runs,
    so this holds before accelerate or a trainer has started, and equals their own is_main_process afterwards; a
    single process has no RANK and is the main one."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def main_process_first():
    """In launched processes the main one runs the block first (writing a file they all read, say) and the others
    wait for it, then run it; in a single process, just the block."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def start_process_group() -> None:
    """Join the launched processes once, for every trainer in this process to use (the stages pass
    accelerator_config.use_configured_state). On a machine without GPUs accelerate 1.15 picks no backend for DeepSpeed
    and then counts a single process, so every rank would think it is rank 0 of 1; naming gloo there avoids that."""
    import torch
    from accelerate import PartialState

    PartialState(backend=None if torch.cuda.is_available() else "gloo")


def deepspeed_plugin(dist: DistributedConfig, micro_batch_size: int, hidden_size: int, gradient_clipping: float = 1.0):
    """accelerate's DeepSpeed plugin for distributed.deepspeed (None without), its "auto" values filled for code that
    drives accelerate itself (PPO's loop, the llm judge): accelerate fills them from a prepared dataloader and the
    model's config, which these do not have. The bucket sizes are the ones transformers' Trainer picks."""
    if not dist.deepspeed:
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(Path(dist.deepspeed).resolve()))
    ds = plugin.deepspeed_config
    filled = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch_size * dist.world_size, "gradient_clipping": gradient_clipping}
    zero = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, value in zero.items():
        if ds.get("zero_optimization", {}).get(key) == "auto":
            ds["zero_optimization"][key] = value
    return plugin


def zero3_sharded(params) -> bool:
    """Whether DeepSpeed ZeRO-3 holds these parameters in slices across processes (its parameters carry ds_status)."""
    return any(hasattr(p, "ds_status") for p in params)


def gathered(params):
    """Under ZeRO-3 each process holds a slice of every parameter: gather `params` whole (every process must enter)
    for reading or saving them; otherwise nothing to do."""
    params = list(params)
    if not zero3_sharded(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
