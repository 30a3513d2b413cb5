"""Sampling responses from a policy: batched, seeded per batch, and resumable batch by batch.

Each batch of prompts is sampled under its own seed (run seed + batch index), so a run interrupted after batch 7
and resumed produces exactly what an uninterrupted run would. Finished batches are appended to a JSONL file and
synced; a torn last line (a kill mid-write) is ignored and that batch is sampled again.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import SamplingConfig
from pipeline.log import log, progress
from pipeline.render import prompt_ids
from reward.pairs import Pair


@dataclass
class Samples:
    responses: list[list[str]]
    """Per prompt, its sampled responses (decoded, special tokens removed, stripped)."""
    truncated: int
    """Responses that reached max_new_tokens without an end-of-turn token."""


def _read_done(path: Path) -> dict[int, dict]:
    """Finished batches; a torn last line (a kill mid-write) is cut off, and that batch is sampled again."""
    done, good = {}, 0
    if path.exists():
        raw = path.read_bytes()
        for line in raw.split(b"\n")[:-1]:  # every complete record ends with a newline
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            done[record["batch"]] = record
            good += len(line) + 1
        if good < len(raw):
            with open(path, "r+b") as handle:
                handle.truncate(good)
    return done


@torch.inference_mode()
def sample_responses(model, tokenizer, prompts: list[list[dict]], sampling: SamplingConfig, seed: int,
                     progress_file: Path) -> Samples:
    """`sampling.num_responses` responses for every prompt; finished batches are kept in `progress_file`."""
    done = _read_done(progress_file)
    if done:
        log(f"sampling: {len(done)} batches already sampled in {progress_file.name}; continuing after them")
    batches = [prompts[i:i + sampling.batch_size] for i in range(0, len(prompts), sampling.batch_size)]
    end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last token of every row
    try:
        with open(progress_file, "a", encoding="utf-8") as sink, progress() as bar:
            task = bar.add_task("sampling", total=len(batches), completed=len(done))
            for index, batch in enumerate(batches):
                if index in done:
                    continue
                encoded = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, p) for p in batch]},
                                        return_tensors="pt")
                torch.manual_seed(seed + index)
                output = model.generate(
                    **encoded.to(model.device), do_sample=True, temperature=sampling.temperature,
                    top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                    num_return_sequences=sampling.num_responses,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
                new = output[:, encoded["input_ids"].shape[1]:]
                texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
                truncated = sum(not any(int(t) in end_ids for t in row) for row in new)
                k = sampling.num_responses
                record = {"batch": index, "responses": [texts[i * k:(i + 1) * k] for i in range(len(batch))],
                          "truncated": truncated}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                done[index] = record
                bar.advance(task)
    finally:
        tokenizer.padding_side = padding_side
    ordered = [done[i] for i in range(len(batches))]
    return Samples([r for record in ordered for r in record["responses"]], sum(r["truncated"] for r in ordered))


@dataclass
class SampledPairs:
    pairs: list[Pair]
    """Every two distinct responses to a prompt, as a pair (k responses: k(k-1)/2 pairs)."""
    responses: int
    """Responses sampled."""
    truncated: int
    """Responses that reached max_new_tokens without an end-of-turn token."""
    identical: int
    """Pairs left out because both responses were the same text: there is nothing to prefer."""


def sample_pairs(model, tokenizer, prompts: list[tuple[list[dict], str]], sampling: SamplingConfig, seed: int,
                 progress_file: Path) -> SampledPairs:
    """`sampling.num_responses` responses to each (prompt, source) and the pairs they make (sample_responses)."""
    samples = sample_responses(model, tokenizer, [p for p, _ in prompts], sampling, seed, progress_file)
    pairs, identical = [], 0
    for (prompt, source), responses in zip(prompts, samples.responses):
        for a, b in itertools.combinations(responses, 2):
            if a == b:
                identical += 1
                continue
            pairs.append(Pair.create(prompt, a, b, source))
    return SampledPairs(pairs, sum(map(len, samples.responses)), samples.truncated, identical)
