"""The reference for sft_bench.py: the pipeline's sft stage written as a plain TRL script, nothing else.

Called by sft_bench.py with a JSON spec (model dir, LoRA options, data file, SFTConfig keys); imports nothing from
the pipeline, so its wall time is what TRL + transformers + PEFT cost on their own.
"""

import json
import sys

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

# SmolLM2's own chat template with {% generation %} markers around each assistant reply and its <|im_end|>. TRL 1.16
# cannot patch this template itself, and without the markers `assistant_only_loss` is impossible: the loss (and
# TRL's fused LM head, which only projects labelled positions) would cover every token, while the pipeline takes
# the loss on assistant turns only. Same rendered text; checked against the tokenizer's template below.
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main(spec: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data"], split="train")

    sample = dataset[0]["messages"]
    assistant_only = tokenizer.apply_chat_template(sample, tokenize=False) == tokenizer.apply_chat_template(
        sample, tokenize=False, chat_template=SMOLLM2_MARKED)
    if assistant_only:
        tokenizer.chat_template = SMOLLM2_MARKED
    else:
        print("bare_trl_sft: not SmolLM2's template; loss on every token (not comparable)", file=sys.stderr)

    args = SFTConfig(
        output_dir=spec["output_dir"], seed=spec["seed"], bf16=False, report_to="none",
        assistant_only_loss=assistant_only, **spec["trainer"],
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **spec["lora"]),
    )
    trainer.train()
    # The pipeline saves the final adapter and tokenizer too; do the same so both do the same work.
    trainer.save_model(spec["output_dir"] + "/final")
    tokenizer.save_pretrained(spec["output_dir"] + "/final")
    with open(spec["output_dir"] + "/metrics.jsonl", "w") as handle:  # for the bench's sanity check
        for entry in trainer.state.log_history:
            handle.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
