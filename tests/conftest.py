"""Shared fixtures. Tests never touch the network and never need a GPU: built-in models are materialised once into
a persistent cache (so CI pays the GGUF conversion once), trackers run offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("PIPELINE_CACHE_DIR", str(Path.home() / ".cache" / "alignment-pipeline-tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# glibc hands every block over 32 MB (a batch of logits over the embedded model's 49k vocabulary is hundreds of MB)
# back to the kernel on free and page-faults it in again on the next step: half of a tiny-model run's CPU time was
# spent in the kernel when the tiny model had that vocabulary too (it now has 2,048 tokens; the e2e tests use 49k).
# Keeping freed memory in the heap halves the wall time of the pipeline runs the tests start (README: CPU runs).
os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(16 << 30))
os.environ.setdefault("MALLOC_TOP_PAD_", str(1 << 30))
# One intra-op thread per process: the suite runs in parallel (pytest -n, one worker per core), and OpenMP threads
# contending for the same cores made pipeline runs many times slower (see tests/integration/test_ppo.py). Set before
# anything imports torch; the pipeline processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from pipeline.models import resolve_model_path

    return resolve_model_path("tiny-random-smollm2")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    return load_tokenizer(ModelConfig("tiny-random-smollm2"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's full 49k-token tokenizer (the tiny model keeps its first 2,048 tokens), for the tests
    about how a real BPE vocabulary's tokens straddle the chat template's boundaries."""
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    return load_tokenizer(ModelConfig("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT encoder (no head, as all-MiniLM-L6-v2 ships) with a WordPiece tokenizer whose
    vocabulary is the words of data/classify/, built from a config: what the cls tests train."""
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    words = set()
    for path in (REPO / "data" / "classify").glob("*.jsonl"):
        words |= set(re.findall(r"\w+|[^\w\s]", path.read_text().lower()))
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_pipeline(*args: str, check: bool = True):
    """Run `python -m pipeline ...` in a subprocess from the repo root, as a user would."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def load_safetensors_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def kill_when(args: list[str], condition, what: str):
    """Start `python -m pipeline *args`, SIGKILL it as soon as `condition()` returns something true, and return
    that. The whole process group is killed, as a preemption would, launched processes included."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = condition()
        if found:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return found
        time.sleep(0.02)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"the run ended (exit {process.poll()}) before it could be interrupted {what}")


def kill_after_first_checkpoint(stage: str, run_dir: Path, args: list[str], checkpoints: Path | None = None) -> str:
    """Start `python -m pipeline *args`, SIGKILL it as soon as `stage` has a complete checkpoint (in `checkpoints`,
    by default <run_dir>/<stage>/checkpoints); return its name."""
    checkpoints = checkpoints or run_dir / stage / "checkpoints"

    def newest():
        markers = list(checkpoints.glob("checkpoint-*/COMPLETE")) if checkpoints.exists() else []
        # The newest complete checkpoint is the one a resume must pick.
        return max((m.parent for m in markers), key=lambda p: int(p.name.split("-")[1])).name if markers else None

    return kill_when(args, newest, f"after {stage}'s first checkpoint")


def max_abs_diff(expected_dir: Path, actual_dir: Path) -> float:
    """The largest difference between two directories' safetensors weights (same keys required)."""
    expected, actual = load_safetensors_dir(expected_dir), load_safetensors_dir(actual_dir)
    assert expected.keys() == actual.keys()
    return max((expected[k] - actual[k]).abs().max().item() for k in expected)


def assert_adapter_changes_output(base_model: str, adapter_dir: Path) -> None:
    """The adapter loads with plain PEFT on its recorded base, and switching it off changes the model's output."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            reference = model(ids).logits
    assert not torch.allclose(tuned, reference)


def with_large_random_weights(model, std: float, seed: int):
    """`model` with every matrix redrawn from N(0, std): the tiny model's own small weights give nearly the same
    output for every input, which leaves a judge built on it nothing to tell apart."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, std, generator=generator)
    return model


def build_hub_dataset_cache(cache_dir: Path, repo_id: str, splits: dict[str, list[dict]], revision: str = "0" * 40):
    """Put `splits` into a `datasets` cache as a download of the Hub dataset `repo_id` leaves it (the packaged json
    builder's Arrow files under <org>___<name>/default/0.0.0/<revision>/), so that with HF_DATASETS_OFFLINE=1 and
    HF_DATASETS_CACHE=cache_dir, load_dataset(repo_id, split=...) reads it as it would a real one from its cache."""
    import json
    import shutil

    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    staging = cache_dir / ".staging"
    files = {}
    for split, records in splits.items():
        files[split] = str(staging / f"{split}.jsonl")
        (staging).mkdir(parents=True, exist_ok=True)
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in records))
    builder = Json(cache_dir=str(staging / "build"), dataset_name=name, config_name="default", config_id="default",
                   data_files=files, hash=revision)
    builder.download_and_prepare()
    shutil.copytree(staging / "build" / name, cache_dir / f"{org}___{name}", dirs_exist_ok=True)
    shutil.rmtree(staging)
    return cache_dir


HUB_COMMIT = "c0ffee" + "0" * 34


def build_hub_model_cache(hub_cache: Path, repo_id: str, model_dir: Path, commit: str = HUB_COMMIT) -> Path:
    """Copy a saved model into huggingface_hub's cache layout, models--<org>--<name>/snapshots/<commit>/ with
    refs/main naming the commit, as a download of `repo_id` leaves it; returns the snapshot directory."""
    import shutil

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
