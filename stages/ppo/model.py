"""Actor, critic and reference: the models PPO holds, in the three layouts `peft.method` and `ppo.critic` choose.

- LoRA, shared critic (ppo.critic unset, the default): ONE copy of the weights. The starting policy (base + sft
  adapter) is merged into the base; the actor is that base with the "actor" adapter, the reference the same base
  with every adapter disabled (exactly the starting policy), the critic the base with the "critic" adapter and a
  linear value head on the decoder's last hidden state. Holding one copy instead of three is what makes PPO fit where
  SFT fits (the peers' most common PPO failure is running out of memory holding actor, critic and reference at once).
- LoRA, separate critic (ppo.critic set): actor and reference as above; the critic is another (usually smaller)
  model's decoder with its own "critic" LoRA adapter (from the same `peft` options) and the value head.
- Full fine-tuning (peft.method: full): every weight of the actor trains, so the reference is a frozen copy of the
  starting policy, and the critic is always a separate model (ppo.critic, or by default a copy of the starting
  policy), fully trained, as OpenRLHF's critic and TRL's old PPOTrainer's value model are.

The critic reads the policy's token ids, so a separate critic must share the policy's vocabulary (checked before any
compute). A critic that is a reward model (a sequence-classification checkpoint or adapter, e.g. `ppo.critic: rm`)
starts its value head from the reward model's score head, as InstructGPT initialises its value function.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.config import REGISTRY, RunConfig
from pipeline.context import ModelSource
from pipeline.errors import ConfigError, PipelineError

ACTOR, CRITIC = "actor", "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


def _has_adapters(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class ActorCritic(nn.Module):
    """One module so that accelerate prepares (and DeepSpeed shards) a single model; `role` picks what a forward
    computes. Every forward returns one value per response position: the predictions for tokens `response_length`
    positions from the end of `input_ids` (a left-padded prompt followed by a right-padded response).

    `policy` is the actor (a PEFT model with the actor adapter, or a plain causal LM under full fine-tuning);
    `critic` the separate critic's decoder, or None when the critic is an adapter on the policy; `reference` the
    frozen starting policy, or None when it is the policy with its adapters off."""

    def __init__(self, policy, value_head: nn.Linear, critic=None, reference=None):
        super().__init__()
        self.policy, self.value_head, self.critic, self.reference = policy, value_head, critic, reference
        self.adapters = _has_adapters(policy)
        self.trainable_names = sorted(name for name, _ in self.named_parameters() if self._trains(name))
        self.trainable_parameters = [p for name, p in self.named_parameters() if name in self.trainable_names]
        self._keep_trainable()

    def _trains(self, name: str) -> bool:
        """The value head, the adapters of a PEFT model, and every weight of a model without adapters; never the
        reference."""
        if name.startswith("value_head."):
            return True
        for part in ("policy", "critic"):
            if name.startswith(f"{part}."):
                model = getattr(self, part)
                return not _has_adapters(model) or any(f".{a}." in name for a in (ACTOR, CRITIC))
        return False

    def _keep_trainable(self) -> None:
        # PEFT's set_adapter and disable_adapter freeze every adapter but the active one. The optimiser trains both
        # adapters, and a parameter whose requires_grad is off at backward time silently gets no gradient.
        for param in self.trainable_parameters:
            param.requires_grad_(True)

    def use(self, adapter: str) -> None:
        if self.adapters:
            self.policy.set_adapter(adapter)
            self._keep_trainable()

    def forward(self, input_ids, attention_mask, response_length: int, role: str):
        """role "reference": the reference's logits; "actor_critic": the actor's logits and the critic's values,
        in one call, so a distributed wrapper (DDP, DeepSpeed) sees one forward per backward."""
        # Positions count real tokens only, as generate() numbers them: left padding must not shift the prompt.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if role == "reference":
            if self.reference is not None:
                return self._logits(self.reference, inputs, response_length)
            with self.policy.disable_adapter():
                logits = self._logits(self.policy, inputs, response_length)
            self._keep_trainable()
            return logits
        if role != "actor_critic":
            raise ValueError(f"unknown role {role!r}")
        self.use(ACTOR)
        logits = self._logits(self.policy, inputs, response_length)
        if self.critic is None:
            self.use(CRITIC)
            hidden = self.policy.get_base_model().get_decoder()(**inputs).last_hidden_state
        else:
            hidden = self.critic(**inputs).last_hidden_state
        # The value of a state is read where the next token is predicted: one position before each response token.
        hidden = hidden[:, -response_length - 1:-1]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    @staticmethod
    def _logits(model, inputs: dict, response_length: int) -> torch.Tensor:
        # Only the positions that predict response tokens: the full vocabulary over the prompt is never needed.
        output = model(**inputs, logits_to_keep=response_length + 1)
        return output.logits[:, :-1]


def actor_peft_config(config: RunConfig):
    """The actor's adapter config from `peft` (None: full fine-tuning); refuses what PPO cannot train."""
    from pipeline.models import peft_config_for

    if config.peft.method not in ("lora", "full"):
        raise ConfigError(
            f"ppo trains LoRA adapters (the reference is the policy with its adapters off) or every weight "
            f"(peft.method: full, the reference a frozen copy); peft.method={config.peft.method} is not supported "
            "by ppo: set peft.method to lora or full"
        )
    if config.distributed.deepspeed and (config.ppo.critic is not None or config.peft.method == "full"):
        what = ("a separate critic (ppo.critic)" if config.ppo.critic is not None
                else "full fine-tuning (peft.method: full)")
        raise ConfigError(
            f"ppo under DeepSpeed (distributed.deepspeed={config.distributed.deepspeed}) trains LoRA actor and critic "
            f"adapters on one shared base; {what} is not supported under DeepSpeed yet: use peft.method: lora with "
            "the shared critic (ppo.critic unset), or run without distributed.deepspeed"
        )
    return peft_config_for(config.peft)


def check_critic(config: RunConfig) -> None:
    """Before any compute: ppo.critic names something that can be a critic, with the policy's vocabulary (a stage's
    result is checked when ppo starts, once that stage has run)."""
    from pipeline.models import load_tokenizer

    spec = config.ppo.critic
    if spec is None:
        return
    if spec in REGISTRY:
        if REGISTRY[spec].output == "pairs" or spec == "ppo":  # data, or the critic's own stage
            raise ConfigError(f"ppo.critic '{spec}': that stage makes no model to start a critic from; name cpt, sft, "
                              "rm or dpo, a built-in model, or a model directory")
        return
    check_vocabulary(config, critic_source(config, None, None), load_tokenizer(config.model))


def critic_source(config: RunConfig, run_dir: Path | None, base_dir: Path | None) -> ModelSource | None:
    """Where a separate critic starts from: ppo.critic (a stage of this run, a built-in name, a model or adapter
    directory), or under full fine-tuning by default the starting policy at `base_dir`; None for the shared critic."""
    spec = config.ppo.critic
    if spec is None:
        return ModelSource(base_dir, None, "a copy of the starting policy") if config.peft.method == "full" else None
    if spec in REGISTRY:  # the runner has checked that it completed
        source = ModelSource.named(spec, run_dir)
        return ModelSource(source.base, source.adapter, f"the {spec} stage's result")
    try:
        return ModelSource.named(spec, run_dir)
    except ConfigError:
        raise ConfigError(f"ppo.critic '{spec}' is neither a stage of this run (cpt, sft, rm, dpo), a built-in "
                          "model, nor a model or adapter directory") from None


def check_vocabulary(config: RunConfig, source: ModelSource, tokenizer) -> None:
    """Refuse a critic whose tokenizer is not the policy's: it reads the policy's token ids, one value per token, so
    a different vocabulary would give values for tokens it never saw."""
    from pipeline.models import load_tokenizer

    where = next((d for d in (source.adapter, source.base) if d and (d / "tokenizer_config.json").exists()), None)
    if where is None:
        raise ConfigError(f"ppo.critic '{config.ppo.critic}': {source.adapter or source.base} has no tokenizer, so "
                          "its vocabulary cannot be checked against the policy's; save the tokenizer with it")
    theirs, ours = load_tokenizer(config.model, where).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items()))
        raise ConfigError(
            f"ppo.critic '{config.ppo.critic}': its tokenizer ({where}, {len(theirs)} tokens) is not the policy's "
            f"({len(ours)} tokens; {differ} token/id pairs differ). The critic gives one value per token of the "
            "policy's sequences, by id: choose a critic trained with the policy's tokenizer"
        )


def _load_critic(source: ModelSource, config: RunConfig, tokenizer) -> tuple[nn.Module, nn.Linear | None]:
    """The critic's decoder, its source's adapter merged in, and a reward model's score head (None otherwise)."""
    from pipeline.models import load_policy, load_reward_model

    if _is_reward_model(source):
        model = load_reward_model(source.base, config.model, tokenizer, source.adapter)
        if source.adapter is not None:
            model = model.merge_and_unload()
        return model.base_model, getattr(model, "score", None)
    return load_policy(source.base, source.adapter, config.model, tokenizer).base_model, None


def _is_reward_model(source: ModelSource) -> bool:
    if source.adapter is not None:
        return json.loads((source.adapter / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    architectures = json.loads((source.base / "config.json").read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def build(config: RunConfig, base_dir: Path, tokenizer, critic_from: ModelSource | None = None) -> ActorCritic:
    """The starting weights at `base_dir` as actor (and reference), with a critic from `critic_from` (None: an adapter
    on the policy): fresh adapters, and a value head at zero (or a reward model critic's score head)."""
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline.models import load_causal_lm, peft_config_for

    peft_config = actor_peft_config(config)
    set_seed(config.seed)  # the adapters' A matrices are random: equal configs must give equal runs
    policy = load_causal_lm(base_dir, config.model, tokenizer)
    reference = None
    if peft_config is None:
        # Full fine-tuning moves every weight of the policy, so the reference can no longer be the policy with its
        # adapters off: this frozen copy of the starting weights is the one second copy PPO cannot avoid.
        reference = load_causal_lm(base_dir, config.model, tokenizer).requires_grad_(False).eval()
        policy.requires_grad_(True)
    else:
        policy = get_peft_model(policy, peft_config, adapter_name=ACTOR)
        if critic_from is None:
            policy.add_adapter(CRITIC, copy.deepcopy(peft_config))
    critic = score = None
    if critic_from is not None:
        critic, score = _load_critic(critic_from, config, tokenizer)
        if peft_config is None:
            critic.requires_grad_(True)
        else:
            critic = get_peft_model(critic, peft_config_for(config.peft, "FEATURE_EXTRACTION"), adapter_name=CRITIC)
    hidden = (policy if critic is None else critic).config.hidden_size
    value_head = nn.Linear(hidden, 1, dtype=torch.float32)
    # Zero weights: the first values are 0 everywhere, a neutral baseline while the critic learns. A reward model's
    # score head instead starts the values at its scores of each prefix (InstructGPT's value initialisation).
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    if score is not None:
        with torch.no_grad():
            value_head.weight.copy_(score.weight)
            if score.bias is not None:
                value_head.bias.copy_(score.bias)
    return ActorCritic(policy, value_head, critic, reference)


def save_adapter(module: ActorCritic, adapter: str, out: Path) -> None:
    """`adapter` as a plain PEFT adapter directory, loadable with PeftModel.from_pretrained on the base."""
    # PEFT writes a non-default adapter into a subdirectory named after it; the pipeline's adapters sit at the top.
    module.policy.save_pretrained(out, selected_adapters=[adapter], save_embedding_layers=False)
    nested = out / adapter
    for file in nested.iterdir():
        os.replace(file, out / file.name)
    nested.rmdir()


def save_policy(module: ActorCritic, tokenizer, out: Path) -> None:
    """final/: the actor adapter (on the stage's base_model), or under full fine-tuning the whole model."""
    if module.adapters:
        save_adapter(module, ACTOR, out)
    else:
        module.policy.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_critic(module: ActorCritic, tokenizer, out: Path) -> None:
    """critic/: the shared critic's adapter (on the stage's base_model), or a separate critic as a whole model
    (AutoModel.from_pretrained, its adapter merged in) with the policy's tokenizer; and value_head.safetensors."""
    from safetensors.torch import save_file

    if module.critic is None:
        save_adapter(module, CRITIC, out)
    else:
        # Merged on a copy: the critic in training keeps its adapter (a separate critic is the small model).
        critic = copy.deepcopy(module.critic).merge_and_unload() if _has_adapters(module.critic) else module.critic
        critic.save_pretrained(out)
        tokenizer.save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in module.value_head.state_dict().items()}, out / VALUE_HEAD_FILE)


def register_checkpoint_hooks(accelerator, module: ActorCritic) -> None:
    """Make accelerator.save_state/load_state keep only what trains (the adapters, a fully trained actor or critic,
    the value head), never the frozen base or reference weights. Under DeepSpeed its engine saves the model itself
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
