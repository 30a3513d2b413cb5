"""Models as users name them: Hub ids through the Hugging Face cache (offline here), the attention kernel, remote
code only when trusted."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import HUB_COMMIT, REPO, build_hub_model_cache

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model_path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return build_hub_model_cache(tmp_path / "hub", "acme/tiny-chat", tiny_model_dir)


def test_hub_id_resolves_to_its_cached_snapshot_by_branch_or_commit(hub_cache):
    assert resolve_model_path("acme/tiny-chat") == hub_cache
    assert resolve_model_path("acme/tiny-chat", revision=HUB_COMMIT) == hub_cache
    assert resolve_model_path("acme/tiny-chat", revision="main").name == HUB_COMMIT
    with pytest.raises(ConfigError, match="at revision 'v2' is not in the Hugging Face cache"):
        resolve_model_path("acme/tiny-chat", revision="v2")
    with pytest.raises(ConfigError, match="neither a built-in"):
        resolve_model_path("not a/model id")
    tokenizer = load_tokenizer(ModelConfig("acme/tiny-chat", revision="main"))
    assert tokenizer.eos_token == "<|im_end|>"


def test_attn_implementation_reaches_the_model(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir, ModelConfig("tiny-random-smollm2", attn_implementation="eager"), tokenizer)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        load_causal_lm(tiny_model_dir, ModelConfig("tiny-random-smollm2", attn_implementation="no_such"), tokenizer)


def test_remote_code_runs_only_when_trusted(tmp_path, tiny_model_dir, tokenizer):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="acme_custom", auto_map={"AutoConfig": "configuration_acme.AcmeConfig",
                                                      "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="set model.trust_remote_code: true if you trust its authors"):
        load_causal_lm(custom, ModelConfig(str(custom)), tokenizer)


def test_tiny_model_keeps_smollm2s_first_tokens_and_encodes_every_text(tiny_model_dir, tokenizer):
    """The tiny model's tokenizer is SmolLM2's cut to 2,048 tokens: the same special tokens, ids and chat template,
    and every text (here the shipped data, and bytes no merge covers) encodes and decodes back exactly."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.models import TINY_VOCAB

    full = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    assert len(tokenizer) == TINY_VOCAB == AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    assert (tokenizer.eos_token, tokenizer.pad_token) == (full.eos_token, full.pad_token)
    assert all(tokenizer.convert_tokens_to_ids(t) == full.convert_tokens_to_ids(t) for t in full.all_special_tokens)
    chat = [{"role": "user", "content": "Why do bees swarm?"}, {"role": "assistant", "content": "To split the hive."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == full.apply_chat_template(chat, tokenize=False)
    for text in [(REPO / "data/sft/beekeeping_qa.jsonl").read_text()[:20000], "Ünïcödé 蜜蜂 🐝 \t\n x"]:
        ids = tokenizer(text).input_ids
        assert max(ids) < TINY_VOCAB and tokenizer.decode(ids) == text
        assert len(ids) > len(full(text).input_ids)  # fewer merges: more, shorter tokens
