"""The reference for ppo_bench.py: TRL's RLOOTrainer on the prompts, model, LoRA, sampling and reward of our ppo stage.

Called by ppo_bench.py with a JSON spec (model dir, dtype, chat template, LoRA options, prompts file, RLOOConfig
keys, the reward rule as "module:function"); imports nothing from the pipeline (the rule is plain Python from
reward/rules.py, the same function the ppo stage scores with). Writes <output_dir>/result.json: the completion
tokens generated, the wall time of trainer.train(), TRL's log history and, on CUDA, the process's peak allocated memory.
"""

import importlib
import json
import sys
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import RLOOConfig, RLOOTrainer


def main(spec: dict) -> None:
    sys.path.insert(0, spec["root"])  # the reward rule's package
    module, name = spec["reward"].split(":")
    rule = getattr(importlib.import_module(module), name)
    generated = {"tokens": 0, "completions": 0, "calls": 0}

    def reward(prompts, completions, completion_ids, **kwargs):
        # TRL calls this once per generation batch with the token ids it sampled (through the first EOS, as the ppo
        # stage counts them), so counting here is exact; its own `num_tokens` adds the prompt tokens.
        generated["tokens"] += sum(len(ids) for ids in completion_ids)
        generated["completions"] += len(completion_ids)
        generated["calls"] += 1
        # Conversational prompts give each completion as [{"role": "assistant", "content": text}]; the ppo stage
        # hands the rule the decoded text stripped, so do the same.
        return [float(rule(prompt, completion[0]["content"].strip()))
                for prompt, completion in zip(prompts, completions)]

    reward.__name__ = name  # TRL logs rewards/<name>/mean

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec["chat_template"]:
        tokenizer.chat_template = spec["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    dataset = load_dataset("json", data_files=spec["prompts"], split="train")

    # TRL tokenizes conversational prompts with apply_chat_template(tokenize=True); the ppo stage renders the text and
    # tokenizes it without special tokens. Same ids means same prompts on both sides.
    first = dataset[0]["prompt"]
    trl_ids = tokenizer.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=True)
    text = tokenizer.apply_chat_template(first, add_generation_prompt=True, tokenize=False)
    same_prompt_ids = list(trl_ids["input_ids"]) == tokenizer(text, add_special_tokens=False)["input_ids"]

    args = RLOOConfig(
        output_dir=spec["output_dir"], seed=spec["seed"], report_to="none", logging_steps=1,
        # RLOOConfig's defaults differ from the ppo stage: bf16 on, gradient checkpointing on, a linearly decaying
        # learning rate. The ppo stage keeps the model's dtype, no gradient checkpointing and a constant rate.
        # Its checkpoints are outside the time it reports, so this side saves none.
        bf16=False, activation_checkpointing=False, lr_scheduler_type="constant", save_strategy="no",
        **spec["trainer"],
    )
    trainer = RLOOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **spec["lora"]),
    )
    started = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - started
    result = {
        **generated, "train_wall": train_wall, "same_prompt_ids": same_prompt_ids,
        "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "log_history": trainer.state.log_history,
    }
    with open(spec["output_dir"] + "/result.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
