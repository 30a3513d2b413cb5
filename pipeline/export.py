"""A stage's result outside the pipeline: `export` writes it as a standalone Hugging Face model directory, `generate`
answers a prompt file into JSONL, `chat` talks to it in the terminal.

Each reads the run as the run left it: the resolved config.yaml (dtype, chat template, system prompt) and the
stage's final/ with the base its stage.json records, loaded exactly as the pipeline's own evaluation loads it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from pipeline.artifacts import completed, read_manifest
from pipeline.config import REGISTRY, load_config
from pipeline.context import ModelSource
from pipeline.errors import PipelineError
from pipeline.log import log, warn

# Where huggingface_hub keeps a model's snapshot: the repo id and the commit can be read back from the path.
_HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def stage_result(run_dir: Path, stage: str):
    """(the run's config, where the stage's result is) for a completed stage that produced a model."""
    if stage not in REGISTRY or REGISTRY[stage].output not in ("policy", "reward_model"):
        models = [name for name, spec in REGISTRY.items() if spec.output in ("policy", "reward_model")]
        raise PipelineError(f"'{stage}' does not produce a model; these do: {', '.join(models)}")
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise PipelineError(f"{run_dir} has no config.yaml: is it a run directory?")
    if not completed(read_manifest(run_dir / stage)):
        raise PipelineError(f"{stage} has not completed in {run_dir}: run it first")
    return load_config(config_path), ModelSource.of_stage(run_dir / stage)


def load_result(run_dir: Path, stage: str):
    """(model, tokenizer, config) of a policy stage's result, as the pipeline's evaluation loads it: the adapter
    merged into its base (a prompt-learning adapter stays an adapter), in eval mode."""
    from pipeline.models import load_policy, load_tokenizer

    if REGISTRY.get(stage) and REGISTRY[stage].output != "policy":
        raise PipelineError(f"{stage}'s result is a reward model, not a policy to generate with")
    config, source = stage_result(run_dir, stage)
    tokenizer = load_tokenizer(config.model, source.adapter or source.base)
    return load_policy(source.base, source.adapter, config.model, tokenizer), tokenizer, config


def export(run_dir: Path, stage: str, out: Path, adapter_only: bool = False) -> Path:
    """Write the stage's result to `out`: a whole model with its adapter merged in (AutoModelForCausalLM, or
    AutoModelForSequenceClassification for rm) and its tokenizer, or with `adapter_only` the PEFT adapter alone,
    its adapter_config naming the base (a Hub id and commit when the base came from the Hub)."""
    from pipeline.models import load_policy, load_reward_model, load_tokenizer
    from stages.hf_trainer import save_atomic

    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out} exists and is not empty; export into a new directory")
    config, source = stage_result(run_dir, stage)
    if adapter_only:
        if source.adapter is None:
            raise PipelineError(f"{stage}'s result is a whole model (peft.method full): export it without "
                                "--adapter-only")
        save_atomic(lambda staging: _copy_adapter(source, staging), out)
        return out
    tokenizer = load_tokenizer(config.model, source.adapter or source.base)
    if REGISTRY[stage].output == "reward_model":
        model = load_reward_model(source.base, config.model, tokenizer, source.adapter)
        model = model.merge_and_unload() if source.adapter else model
    else:
        model = load_policy(source.base, source.adapter, config.model, tokenizer)
    if hasattr(model, "peft_config"):
        raise PipelineError(f"{stage}'s {config.peft.method} adapter adds virtual tokens rather than weights and "
                            "cannot be merged: export it with --adapter-only")
    save_atomic(lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)), out)
    log(f"exported {source.description} on {source.base}, merged, to {out}: "
        "AutoModelForCausalLM.from_pretrained(...) loads it" if REGISTRY[stage].output == "policy" else
        f"exported the reward model to {out}: AutoModelForSequenceClassification.from_pretrained(...) loads it",
        markup=False)
    return out


def _copy_adapter(source: ModelSource, staging: Path) -> None:
    shutil.copytree(source.adapter, staging)
    config_path = staging / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    hub = _HUB_SNAPSHOT.search(str(source.base))
    if hub:
        adapter_config["base_model_name_or_path"] = f"{hub['org']}/{hub['name']}"
        adapter_config["revision"] = hub["commit"]
    else:
        adapter_config["base_model_name_or_path"] = str(Path(source.base).resolve())
        if source.base.name == "base":  # <stage>/base: an earlier adapter merged into the weights by the run
            warn(f"the adapter applies to {source.base}, the run's weights with an earlier stage's adapter merged "
                 "in; keep that directory with it, or export without --adapter-only for a standalone model")
    config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")


def generate(run_dir: Path, stage: str, prompts_path: Path, out: Path, max_new_tokens: int, temperature: float,
             top_p: float, batch_size: int, seed: int | None) -> Path:
    """Answer every prompt of a prompt file ({"prompt"} or {"messages"} per line) with the stage's result; one JSONL
    line per prompt. Sampled in seeded batches kept in <out>.progress, so an interrupted run continues."""
    from pipeline.config import SamplingConfig
    from reward.importers import load_prompts
    from stages.generate import sample_responses

    prompts = load_prompts(prompts_path)
    model, tokenizer, config = load_result(run_dir, stage)
    sampling = SamplingConfig(num_responses=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              batch_size=batch_size)
    progress_file = out.with_name(out.name + ".progress")
    samples = sample_responses(model, tokenizer, [p for p, _ in prompts], sampling,
                               config.seed if seed is None else seed, progress_file)
    staging = out.with_name(f".{out.name}.tmp")
    with open(staging, "w", encoding="utf-8") as sink:
        for (prompt, where), (response,) in zip(prompts, samples.responses):
            sink.write(json.dumps({"prompt": prompt, "response": response, "source": where}, ensure_ascii=False)
                       + "\n")
    staging.replace(out)
    progress_file.unlink()
    log(f"{len(prompts)} answers in {out} ({samples.truncated} reached max_new_tokens={max_new_tokens})",
        markup=False)
    return out


def chat(run_dir: Path, stage: str, max_new_tokens: int, temperature: float, system: str | None) -> int:
    """Talk to the stage's result: each answer streams as it is generated, and every turn sees the ones before.
    /reset starts over, /history shows the conversation, /quit (or Ctrl-D) ends."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from pipeline.render import prompt_ids

    model, tokenizer, _ = load_result(run_dir, stage)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"chatting with {stage}'s result from {run_dir} (/reset, /history, /quit)", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = list(start)
            continue
        if line == "/history":
            for message in messages:
                print(f"[{message['role']}] {message['content']}")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=model.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens,
                  "streamer": streamer, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                  **({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})}
        worker = threading.Thread(target=model.generate, kwargs=kwargs)
        worker.start()
        sys.stdout.write("bot> ")
        pieces = []
        for piece in streamer:  # printed as it comes
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        worker.join()
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})
