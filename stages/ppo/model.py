"""Actor, critic and reference as one base model: two LoRA adapters and a value head on shared frozen weights.

- actor:     the base with the "actor" adapter; its logits are the policy.
- reference: the same base with every adapter disabled, which is exactly the starting policy, because the starting
             policy (base + sft adapter) was merged into the base weights before the adapters were added.
- critic:    the base with the "critic" adapter, and a linear value head on the decoder's last hidden state.

Holding one copy of the weights instead of three is what makes PPO fit where SFT fits (the peers' most common PPO
failure is running out of memory holding actor, critic and reference at once).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, PipelineError

ACTOR, CRITIC = "actor", "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


class ActorCritic(nn.Module):
    """One module so that accelerate prepares (and DeepSpeed shards) a single model; `role` picks what a forward
    computes. Every forward returns one value per response position: the predictions for tokens `response_length`
    positions from the end of `input_ids` (a left-padded prompt followed by a right-padded response)."""

    def __init__(self, peft_model, value_head: nn.Linear):
        super().__init__()
        self.peft_model, self.value_head = peft_model, value_head
        adapters = (f".{ACTOR}.", f".{CRITIC}.")
        self.trainable_names = sorted(
            name for name, _ in self.named_parameters() if name.startswith("value_head.") or any(a in name for a in adapters)
        )
        self.trainable_parameters = [p for name, p in self.named_parameters() if name in self.trainable_names]
        self._keep_trainable()

    def _keep_trainable(self) -> None:
        # PEFT's set_adapter and disable_adapter freeze every adapter but the active one. The optimiser trains both
        # adapters, and a parameter whose requires_grad is off at backward time silently gets no gradient.
        for param in self.trainable_parameters:
            param.requires_grad_(True)

    def use(self, adapter: str) -> None:
        self.peft_model.set_adapter(adapter)
        self._keep_trainable()

    def forward(self, input_ids, attention_mask, response_length: int, role: str):
        """role "reference": the reference's logits; "actor_critic": the actor's logits and the critic's values,
        in one call, so a distributed wrapper (DDP, DeepSpeed) sees one forward per backward."""
        # Positions count real tokens only, as generate() numbers them: left padding must not shift the prompt.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if role == "reference":
            with self.peft_model.disable_adapter():
                logits = self._logits(inputs, response_length)
            self._keep_trainable()
            return logits
        if role != "actor_critic":
            raise ValueError(f"unknown role {role!r}")
        self.use(ACTOR)
        logits = self._logits(inputs, response_length)
        self.use(CRITIC)
        hidden = self.peft_model.get_base_model().get_decoder()(**inputs).last_hidden_state
        # The value of a state is read where the next token is predicted: one position before each response token.
        hidden = hidden[:, -response_length - 1:-1]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def _logits(self, inputs: dict, response_length: int) -> torch.Tensor:
        # Only the positions that predict response tokens: the full vocabulary over the prompt is never needed.
        output = self.peft_model(**inputs, logits_to_keep=response_length + 1)
        return output.logits[:, :-1]


def zero3_sharded(params) -> bool:
    """Whether DeepSpeed ZeRO-3 holds these parameters in slices across processes (its parameters carry ds_status)."""
    return any(hasattr(p, "ds_status") for p in params)


def lora_config(config: RunConfig):
    """The actor's and the critic's adapter config (both from `peft`); refuses what PPO cannot train yet."""
    from pipeline.models import peft_config_for

    if config.peft.method != "lora":
        raise ConfigError(
            f"ppo trains LoRA adapters on a shared base (the reference is the base with adapters off); "
            f"peft.method={config.peft.method} is not supported by ppo yet: set peft.method to lora"
        )
    if config.ppo.critic is not None:
        raise ConfigError(f"ppo.critic={config.ppo.critic!r}: a separate critic model is not supported yet; leave "
                          "ppo.critic unset to train a value head with its own adapter on the shared base")
    return peft_config_for(config.peft)


def build(config: RunConfig, base_dir: Path, tokenizer) -> ActorCritic:
    """The starting weights at `base_dir` with fresh actor and critic adapters and a zero-initialised value head."""
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline.models import load_causal_lm

    peft_config = lora_config(config)
    set_seed(config.seed)  # the adapters' A matrices are random: equal configs must give equal runs
    model = load_causal_lm(base_dir, config.model, tokenizer)
    peft_model = get_peft_model(model, peft_config, adapter_name=ACTOR)
    peft_model.add_adapter(CRITIC, copy.deepcopy(peft_config))
    # Zero weights: the first values are 0 everywhere, a neutral baseline while the critic learns.
    value_head = nn.Linear(model.config.hidden_size, 1, dtype=torch.float32)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    return ActorCritic(peft_model, value_head)


def save_adapter(module: ActorCritic, adapter: str, out: Path) -> None:
    """`adapter` as a plain PEFT adapter directory, loadable with PeftModel.from_pretrained on the base."""
    # PEFT writes a non-default adapter into a subdirectory named after it; the pipeline's adapters sit at the top.
    module.peft_model.save_pretrained(out, selected_adapters=[adapter], save_embedding_layers=False)
    nested = out / adapter
    for file in nested.iterdir():
        os.replace(file, out / file.name)
    nested.rmdir()


def save_critic(module: ActorCritic, out: Path) -> None:
    from safetensors.torch import save_file

    save_adapter(module, CRITIC, out)
    save_file({k: v.detach().contiguous() for k, v in module.value_head.state_dict().items()}, out / VALUE_HEAD_FILE)


def register_checkpoint_hooks(accelerator, module: ActorCritic) -> None:
    """Make accelerator.save_state/load_state keep only what trains (adapters and value head, a few MB), not the
    frozen base weights (the whole model, on every checkpoint). Under DeepSpeed its engine saves the model itself
    and these hooks see no weights."""
    from safetensors.torch import load_file

    names = set(module.trainable_names)

    def strip(name: str) -> str:
        return name.removeprefix("module.")  # DDP's wrapper prefix

    def save_hook(models, weights, output_dir):
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if strip(k) in names}

    def load_hook(models, input_dir):
        if not models:
            return
        path = Path(input_dir) / "model.safetensors"
        state = {strip(k): v for k, v in load_file(path).items()}
        if set(state) != names:
            raise PipelineError(f"{path} does not hold this run's adapters and value head (missing "
                                f"{sorted(names - set(state))[:3]}, unexpected {sorted(set(state) - names)[:3]})")
        accelerator.unwrap_model(models[0]).load_state_dict(state, strict=False)
        models.pop(0)  # loaded here; accelerate's own strict load would ask for the frozen base weights too

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
