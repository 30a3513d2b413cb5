"""The ppo stage through the CLI on the tiny random model: it learns, it resumes exactly after a SIGKILL (with the
shared or a separate critic), it takes its reward (and a critic) from the rm stage, it fine-tunes every weight against
a frozen reference, and what it leaves loads in plain PEFT / transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO, assert_adapter_changes_output, kill_after_first_checkpoint, load_safetensors_dir, run_pipeline,
)

SMOKE = str(REPO / "configs" / "smoke.yaml")
RULE = ["--set", "ppo.init_from=base", "--set", "ppo.reward.type=rule",
        "--set", "ppo.reward.function=rules_for_tests:distinct_trigrams"]
# The tiny model's logits are nearly flat (random embeddings of std 0.02 under a fixed-norm hidden state): at
# temperature 1 it samples uniformly from its 2,048 tokens, which no LoRA update can concentrate in 20 iterations. At 0.1 it repeats its
# first token over and over, and a reward for distinct trigrams is something it can unlearn within 20 iterations.
LEARNABLE = ["--set", "ppo.trainer.temperature=0.1", "--set", "ppo.trainer.learning_rate=3e-3",
             "--set", "ppo.trainer.kl_coef=0.002", "--set", "ppo.trainer.max_steps=20",
             "--set", "ppo.trainer.save_steps=10", "--set", "ppo.trainer.sample_every=5"]


# One intra-op thread per pipeline process: on a shared 2-core machine, two OpenMP threads contending with other
# jobs made these runs up to 18 times slower (a 20-iteration run: 30 s with one thread, 9 minutes with two).
PIPELINE_ENV = {"PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def pipeline_env(monkeypatch):
    for key, value in PIPELINE_ENV.items():
        monkeypatch.setenv(key, value)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def manifest(run_dir) -> dict:
    return json.loads((Path(run_dir) / "ppo" / "stage.json").read_text())


@pytest.fixture
def one_thread():
    """The same for the model work a test does in its own process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One learning run, shared by the tests that read what it left."""
    run_dir = tmp_path_factory.mktemp("ppo") / "run"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in PIPELINE_ENV.items():
            patch.setenv(key, value)
        run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "ppo", *RULE, *LEARNABLE)
    return run_dir


def test_reward_rises(learned):
    rows = read_jsonl(learned / "ppo" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 21))
    for row in rows:
        assert all(math.isfinite(value) for value in row.values()), row
    first = sum(row["ppo/reward_mean"] for row in rows[:4]) / 4
    last = sum(row["ppo/reward_mean"] for row in rows[-4:]) / 4
    curve = " ".join(f"{row['ppo/reward_mean']:.2f}" for row in rows)
    assert last > first + 0.1, f"reward did not rise: {curve}"
    metrics = manifest(learned)["metrics"]
    assert metrics["ppo/reward_mean_first"] == rows[0]["ppo/reward_mean"]
    assert metrics["ppo/reward_mean"] == rows[-1]["ppo/reward_mean"] and metrics["train/steps"] == 20
    assert metrics["eval/score_mean"] > metrics["eval/score_mean_before"], "held-out prompts improve too"
    tables = read_jsonl(learned / "ppo" / "samples.jsonl")
    assert [table["step"] for table in tables] == [5, 10, 15, 20]
    assert {"prompt", "response", "score", "reward"} <= set(tables[0]["samples"][0])


def test_every_trainable_parameter_changed_and_the_adapter_reloads_in_plain_peft(learned, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer
    from stages.ppo.model import build

    base = Path(manifest(learned)["base_model"])
    # The same config and seed build the same initial adapters: what every parameter started from.
    config = load_config(SMOKE, [arg for arg in RULE + LEARNABLE if arg != "--set"])
    initial = build(config, base, load_tokenizer(config.model, base)).state_dict()
    trained = {"actor": load_safetensors_dir(learned / "ppo" / "final"),
               "critic": load_safetensors_dir(learned / "ppo" / "critic")}
    expected = {name for name in initial if ".actor." in name or ".critic." in name or name.startswith("value_head")}
    seen = set()
    for adapter, tensors in trained.items():
        for key, tensor in tensors.items():
            if key in ("weight", "bias"):  # value_head.safetensors
                name = f"value_head.{key}"
            else:  # PEFT drops the adapter's name from the keys it saves
                name = "policy." + key.replace(".weight", f".{adapter}.weight")
            assert name in expected, name
            assert not torch.equal(tensor, initial[name]), f"{name} did not change"
            seen.add(name)
    assert seen == expected

    tokenizer = AutoTokenizer.from_pretrained(learned / "ppo" / "final")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), learned / "ppo" / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "When do bees swarm?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert json.loads((learned / "ppo" / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("critic", [[], ["--set", "ppo.critic=tiny-random-smollm2"]],
                         ids=["shared-critic", "separate-critic"])
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path, critic):
    def args(run_dir):
        # An adaptive KL coefficient: its state must come back from the checkpoint too.
        return ["run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "ppo", *RULE, *critic,
                "--set", "ppo.trainer.max_steps=6", "--set", "ppo.trainer.save_steps=2",
                "--set", "ppo.trainer.kl_target=0.5", "--set", "ppo.trainer.kl_horizon=100",
                "--set", "ppo.data.eval_split=0", "--set", "evaluation.prompts="]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_pipeline(*args(reference))
    newest = kill_after_first_checkpoint("ppo", killed, args(killed))
    assert json.loads(run_pipeline("status", "--run-dir", str(killed), "--json").stdout)["stages"]["ppo"]["status"] \
        == "interrupted"
    decoy = killed / "ppo" / "checkpoints" / "checkpoint-5"  # a half-written checkpoint: no COMPLETE marker
    decoy.mkdir()
    (decoy / "model.safetensors").write_bytes(b"torn")

    run_pipeline(*args(killed))
    resumed = manifest(killed)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == newest and resumed["attempts"] == 2
    assert not decoy.exists(), "the partial checkpoint is moved to .history/, not resumed from"
    for part in ("final", "critic"):
        expected, actual = load_safetensors_dir(reference / "ppo" / part), load_safetensors_dir(killed / "ppo" / part)
        assert expected.keys() == actual.keys()
        diff = max((expected[k] - actual[k]).abs().max().item() for k in expected)
        assert diff <= 1e-6, f"resumed {part} differs from the uninterrupted run by {diff}"
    # The same samples at every step: the resumed run saw the prompts and seeds the uninterrupted one did.
    def curve(run_dir):
        return [(row["step"], row["ppo/reward_mean"], row["ppo/kl_coef"])
                for row in read_jsonl(run_dir / "ppo" / "metrics.jsonl")]

    resumed_curve, reference_curve = curve(killed), curve(reference)
    assert [row[0] for row in resumed_curve] == [row[0] for row in reference_curve]
    for resumed_row, reference_row in zip(resumed_curve, reference_curve):  # pytest 9's approx takes flat lists only
        assert list(resumed_row) == pytest.approx(list(reference_row), abs=1e-5)
    assert len({kl_coef for _, _, kl_coef in curve(reference)}) > 1, "the KL coefficient adapted"


def test_from_sft_with_the_reward_from_the_rm_stage(tmp_path, one_thread):
    """sft -> rm -> ppo: the sft adapter is merged into ppo's base, the rewards are the rm stage's scores, and the
    critic is a separate model: the reward model with its own LoRA adapter, its value head started from the score
    head."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"How do I look after hive {i}?",
                                         "chosen": f"Inspect hive {i} every week in spring.",
                                         "rejected": "Bees."}) + "\n" for i in range(12)))
    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "sft", "--stage", "rm",
                 "--stage", "ppo", "--set", "sft.trainer.max_steps=2", "--set", "sft.trainer.save_steps=2",
                 "--set", f"rm.data.train={pairs}", "--set", "rm.trainer.max_steps=2", "--set", "rm.data.eval_split=0",
                 "--set", "ppo.trainer.max_steps=2", "--set", "ppo.data.eval_split=0", "--set", "ppo.critic=rm",
                 "--set", "tracking.report_to=[wandb, tensorboard]")
    ppo = manifest(run_dir)
    assert ppo["status"] == "completed" and ppo["metrics"]["train/steps"] == 2
    assert ppo["init"]["adapter"] == str(run_dir / "sft" / "final")
    assert list((run_dir / "wandb").glob(f"offline-run-*-{ppo['wandb_run_id']}"))
    assert list((run_dir / "ppo" / "tensorboard").glob("events.out.tfevents.*"))
    assert 0 <= ppo["metrics"]["eval/win_rate"] <= 1, "compared with the starting policy on evaluation.prompts"
    rows = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(value) for row in rows for value in row.values())

    from pipeline.config import ModelConfig, load_config
    from pipeline.context import ModelSource
    from pipeline.models import load_causal_lm, load_policy, load_tokenizer
    from reward.rm_judge import RewardModelJudge

    # The reference (ppo's base, adapters off) is exactly the sft policy.
    model_cfg = ModelConfig("tiny-random-smollm2")
    assert ppo["base_model"] == str(run_dir / "ppo" / "base")
    sft = ModelSource.of_stage(run_dir / "sft")
    tokenizer = load_tokenizer(model_cfg, sft.base)
    ids = torch.tensor([tokenizer("Bees make honey in summer.")["input_ids"]])
    with torch.no_grad():
        expected = load_policy(sft.base, sft.adapter, model_cfg, tokenizer)(input_ids=ids).logits
        actual = load_causal_lm(run_dir / "ppo" / "base", model_cfg, tokenizer).eval()(input_ids=ids).logits
    assert (expected - actual).abs().max().item() < 1e-5
    # The scores are the reward model's: the rm judge gives the same numbers for the same conversations.
    source = ModelSource.named("rm", run_dir)
    judge = RewardModelJudge.from_path(source.base, model_cfg, adapter=source.adapter)
    [table] = read_jsonl(run_dir / "ppo" / "samples.jsonl")
    scores = judge.score([row["prompt"] for row in table["samples"]], [row["response"] for row in table["samples"]])
    assert scores == pytest.approx([row["score"] for row in table["samples"]], abs=1e-4)

    # The separate critic: every trainable tensor (actor adapter, critic adapter, value head) moved from where build
    # started it, and critic/ reloads as a whole model that gives the values the trained critic gives.
    from safetensors.torch import load_file
    from transformers import AutoModel

    from stages.ppo.model import VALUE_HEAD_FILE, build, critic_source

    assert ppo["critic_init"]["adapter"] == str(run_dir / "rm" / "final")
    config = load_config(SMOKE, ["ppo.critic=rm"])
    base = Path(ppo["base_model"])
    module = build(config, base, load_tokenizer(config.model, base), critic_source(config, run_dir, base))
    rm_score = judge.model.merge_and_unload().score.weight
    assert torch.equal(module.value_head.weight, rm_score.float()), "the value head starts as the rm's score head"
    trained = load_file(run_dir / "ppo" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert set(trained) == set(module.trainable_names)
    assert {name.split(".")[0] for name in trained} == {"policy", "critic", "value_head"}
    initial = module.state_dict()
    assert [name for name in trained if torch.equal(trained[name], initial[name])] == []
    module.load_state_dict(trained, strict=False)
    ids = torch.tensor([tokenizer("Bees make honey in summer.")["input_ids"]])
    with torch.no_grad():
        _, values = module(ids, torch.ones_like(ids), 3, "actor_critic")
        critic = AutoModel.from_pretrained(run_dir / "ppo" / "critic")
        head = torch.nn.Linear(critic.config.hidden_size, 1)
        head.load_state_dict(load_file(run_dir / "ppo" / "critic" / VALUE_HEAD_FILE))
        reloaded = head(critic(input_ids=ids).last_hidden_state[:, -4:-1]).squeeze(-1)
    assert (values - reloaded).abs().max().item() < 1e-5
    assert_adapter_changes_output(ppo["base_model"], run_dir / "ppo" / "final")


@pytest.mark.parametrize("judge", ["contrastive", "rule-pairwise", "llm-pairwise"])
def test_any_judge_rewards_ppo(tmp_path, judge, one_thread):
    """Online RLAIF: the contrastive judge's score of each response (pointwise), and a rule or the A/B llm judge
    comparing each response with the reference policy's to the same prompt (pairwise, 2 p(win) - 1)."""
    run_dir = tmp_path / "run"
    settings = {
        "contrastive": ["type=contrastive", "violation=Be vague."],
        "rule-pairwise": ["type=rule", "function=rules_for_tests:distinct_trigrams"],
        "llm-pairwise": ["type=llm"],
    }[judge]
    pairwise = judge.endswith("pairwise")
    sets = [arg for setting in settings for arg in ("--set", f"ppo.reward.judge.{setting}")]
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "ppo", "--set", "ppo.init_from=base",
                 "--set", "ppo.reward.type=judge", "--set", f"ppo.reward.pairwise={str(pairwise).lower()}", *sets,
                 "--set", "ppo.trainer.max_steps=2", "--set", "ppo.trainer.sample_every=1",
                 "--set", "ppo.trainer.max_new_tokens=8")
    ppo = manifest(run_dir)
    assert ppo["status"] == "completed" and ppo["metrics"]["train/steps"] == 2
    rows = [row for table in read_jsonl(run_dir / "ppo" / "samples.jsonl") for row in table["samples"]]
    prompts, responses = [row["prompt"] for row in rows], [row["response"] for row in rows]
    if judge == "contrastive":
        from pipeline.config import ModelConfig
        from reward.contrastive_judge import ContrastiveJudge

        expected = ContrastiveJudge.from_path(Path(ppo["base_model"]), ModelConfig("tiny-random-smollm2"),
                                              violation="Be vague.").score(prompts, responses)
        assert [row["score"] for row in rows] == pytest.approx(expected, abs=1e-4)
        assert not (run_dir / "ppo" / "reference_responses.jsonl").exists()
        return
    # One reference response per distinct prompt (training and held-out), sampled once from the starting policy.
    from pipeline.config import ModelConfig, load_config
    from reward.llm_judge import LlmJudge
    from stages.ppo import load
    from stages.online import prompt_key, win_reward
    from reward.pairs import Pair

    train, held_out = load(load_config(SMOKE))
    unique = list({prompt_key(p): p for p in train + held_out}.values())
    batches = sorted(read_jsonl(run_dir / "ppo" / "reference_responses.jsonl"), key=lambda batch: batch["batch"])
    references = [responses[0] for batch in batches for responses in batch["responses"]]
    assert len(references) == len(unique)
    reference = dict(zip(map(prompt_key, unique), references))
    if judge == "rule-pairwise":  # a rule gives no confidence: a win is +1, a loss -1, equal scores 0
        from rules_for_tests import distinct_trigrams

        def sign(x):
            return float((x > 0) - (x < 0))

        expected = [sign(distinct_trigrams(p, r) - distinct_trigrams(p, reference[prompt_key(p)]))
                    for p, r in zip(prompts, responses)]
    else:  # the llm judge's verdict with its confidence, position bias removed
        llm = LlmJudge.from_path(Path(ppo["base_model"]), ModelConfig("tiny-random-smollm2"))
        pairs = [Pair.create(p, r, reference[prompt_key(p)], "test") for p, r in zip(prompts, responses)]
        expected = [win_reward(label) for label in llm.judge(pairs)]
        assert all(-1 < value < 1 for value in expected)
    assert [row["score"] for row in rows] == pytest.approx(expected, abs=1e-4)


def _rolled_out(*settings: str):
    """(trainer config, the actor-critic, it prepared by accelerate, its AdamW, a rollout of 8 prompts) on the tiny
    model from its base, at temperature 0.1 and 8 new tokens, with `settings` over smoke.yaml."""
    from accelerate import Accelerator

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, resolve_model_path
    from stages.ppo import load
    from stages.ppo.model import build
    from stages.ppo.rollout import rollout

    config = load_config(SMOKE, ["ppo.init_from=base", "ppo.trainer.temperature=0.1", "ppo.trainer.max_new_tokens=8",
                                 *settings])
    cfg = config.ppo.trainer
    tokenizer = load_tokenizer(config.model)
    module = build(config, resolve_model_path(config.model.name_or_path), tokenizer)
    optimizer = torch.optim.AdamW(module.trainable_parameters, lr=3e-3)
    prepared, optimizer = Accelerator().prepare(module, optimizer)
    return cfg, module, prepared, optimizer, rollout(module, tokenizer, load(config).train[:8], cfg, seed=0)


def test_an_update_raises_the_log_probability_of_advantaged_responses(one_thread):
    """The direction of learning, directly: after one optimise() call, responses with a positive advantage are
    more likely and responses with a negative one less likely."""
    from accelerate import Accelerator

    from stages.ppo.losses import logprobs_from_logits
    from stages.ppo.trainer import optimise

    # At temperature 1 the eight responses are distinct (at 0.1 the tiny model answers most prompts with the same
    # repeated token, so one response can sit on both sides).
    cfg, module, prepared, optimizer, batch = _rolled_out("ppo.trainer.temperature=1.0")
    assert len({tuple(row) for row in batch.responses.tolist()}) == 8
    advantages = torch.ones_like(batch.mask)
    advantages[4:] = -1
    optimise(Accelerator(), prepared, optimizer, batch, advantages * batch.mask, batch.values, cfg,
             torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = module(*batch.inputs(), batch.responses.shape[1], "actor_critic")
    change = ((logprobs_from_logits(logits / cfg.temperature, batch.responses) - batch.logprobs) * batch.mask).sum(1)
    assert (change[:4] > 0).all() and (change[4:] < 0).all(), change


def test_during_the_critic_warm_up_only_the_critic_trains(one_thread):
    """critic_warmup_steps: the iterations up to it move the critic adapter and the value head and leave every actor
    weight as it was (no gradient, so no weight decay either); the next iteration trains the actor."""
    from accelerate import Accelerator

    from stages.ppo.losses import gae
    from stages.ppo.trainer import optimise

    cfg, module, prepared, optimizer, batch = _rolled_out("ppo.trainer.critic_warmup_steps=1",
                                                          "ppo.trainer.num_ppo_epochs=1")
    rewards = torch.zeros_like(batch.values)
    rewards[:, 0] = torch.arange(8.0)  # scores that a value head at zero does not predict
    advantages, returns = gae(rewards * batch.mask, batch.values, batch.mask, cfg.gamma, cfg.lam)

    def snapshot(part: str) -> dict:
        return {name: p.detach().clone() for name, p in module.named_parameters()
                if p.requires_grad and (f".{part}." in name or (part == "critic" and name.startswith("value_head")))}

    actor, critic = snapshot("actor"), snapshot("critic")
    assert actor and critic
    for step, actor_trains in ((1, False), (2, True)):
        optimise(Accelerator(), prepared, optimizer, batch, advantages, returns, cfg, torch.Generator().manual_seed(0),
                 step)
        now = snapshot("actor")
        assert all(torch.equal(now[name], actor[name]) for name in actor) != actor_trains, f"iteration {step}"
        assert any(not torch.equal(p, critic[name]) for name, p in snapshot("critic").items()), f"iteration {step}"
        critic = snapshot("critic")


def test_full_fine_tuning_trains_every_weight_against_a_frozen_reference(tmp_path, tiny_model_dir, one_thread):
    """peft.method full: every weight of the actor and of its critic (by default a copy of the starting policy)
    trains, the reference stays the starting policy, and final/ is a whole model for plain transformers."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "ppo", *RULE,
                 "--set", "peft.method=full", "--set", "peft.options={}", "--set", "ppo.trainer.max_steps=2",
                 "--set", "ppo.data.eval_split=0")
    ppo = manifest(run_dir)
    assert ppo["status"] == "completed" and ppo["critic_init"]["base"] == str(tiny_model_dir)
    kl = [row["ppo/kl"] for row in read_jsonl(run_dir / "ppo" / "metrics.jsonl")]
    assert kl[0] == 0.0, "the first rollout's actor is the reference, bit for bit"
    # ppo/kl is the sampled estimate (log-ratio summed over the response), which can fall below 0; the held-out KL
    # cannot.
    assert kl[-1] != 0.0 and ppo["metrics"]["eval/kl_to_start"] > 0, "the reference stayed where the actor started"

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "final")
    critic = AutoModel.from_pretrained(run_dir / "ppo" / "critic")
    for trained, prefix in ((dict(final.named_parameters()), ""), (dict(critic.named_parameters()), "model.")):
        for name, param in start.named_parameters():
            if name.startswith(prefix):
                assert not torch.equal(trained[name.removeprefix(prefix)], param), f"{name} did not change"
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "ppo" / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "When do bees swarm?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert final.generate(**prompt, max_new_tokens=5, do_sample=False).shape[1] > prompt["input_ids"].shape[1]


def test_full_fine_tuning_checkpoints_what_trains_and_resumes_exactly(tmp_path, one_thread):
    """In one process, the mechanism a resumed full fine-tuning relies on: the checkpoint holds every actor and critic
    weight and the value head but not the frozen reference, and loading it then repeating a step repeats it exactly."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, resolve_model_path
    from stages.ppo import load
    from stages.ppo.model import build, critic_source, register_checkpoint_hooks
    from stages.ppo.rollout import rollout
    from stages.ppo.trainer import optimise

    config = load_config(SMOKE, ["ppo.init_from=base", "peft.method=full", "peft.options={}",
                                 "ppo.trainer.max_new_tokens=8", "ppo.trainer.num_ppo_epochs=1"])
    cfg, base = config.ppo.trainer, resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(config.model)
    module = build(config, base, tokenizer, critic_source(config, None, base))
    reference = {name: param.clone() for name, param in module.reference.named_parameters()}
    accelerator = Accelerator()
    prepared, optimizer = accelerator.prepare(module, torch.optim.AdamW(module.trainable_parameters, lr=1e-3))
    register_checkpoint_hooks(accelerator, module)
    prompts = load(config).train[:8]

    def step(seed: int) -> dict:
        batch = rollout(module, tokenizer, prompts, cfg, seed)
        advantages = torch.linspace(-1, 1, batch.mask.numel()).view_as(batch.mask) * batch.mask
        optimise(accelerator, prepared, optimizer, batch, advantages, batch.values + advantages, cfg,
                 torch.Generator().manual_seed(seed))
        return {name: param.detach().clone() for name, param in module.named_parameters()
                if name in module.trainable_names}

    step(0)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    expected = {name for name, _ in module.named_parameters() if not name.startswith("reference.")}
    assert set(saved) == set(module.trainable_names) == expected
    after = step(1)
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert all(torch.equal(saved[name], param) for name, param in module.named_parameters() if name in saved)
    repeated = step(1)
    assert max((after[name] - repeated[name]).abs().max().item() for name in after) <= 1e-6
    assert all(torch.equal(reference[name], param) for name, param in module.reference.named_parameters())
    assert not any(param.requires_grad for param in module.reference.parameters())


def test_a_critic_ppo_cannot_use_is_refused_before_any_compute(tmp_path, tiny_model_dir):
    """ppo's preflight check (what `run` calls before any stage starts): a critic with another vocabulary, none to
    compare, or no model at all; and the roles DeepSpeed does not support yet."""
    import shutil

    from transformers import AutoTokenizer

    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from stages.ppo import check

    other = tmp_path / "other-vocabulary"
    other.mkdir()
    shutil.copy(tiny_model_dir / "config.json", other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<|hive|>"])
    tokenizer.save_pretrained(other)
    untokenized = tmp_path / "no-tokenizer"
    untokenized.mkdir()
    shutil.copy(tiny_model_dir / "config.json", untokenized)
    deepspeed = ["distributed.deepspeed=configs/deepspeed/zero2.json", "distributed.num_processes=2"]
    for settings, message in (
        ([f"ppo.critic={other}"], "is not the policy's"), ([f"ppo.critic={untokenized}"], "has no tokenizer"),
        (["ppo.critic=preferences"], "that stage makes no model"),
        ([f"ppo.critic={tmp_path / 'nowhere'}"], "is neither a stage"),
        (["ppo.critic=tiny-random-smollm2", *deepspeed], r"a separate critic \(ppo.critic\) is not supported under Deep"),
        (["peft.method=full", "peft.options={}", *deepspeed], r"full fine-tuning \(peft.method: full\) is not supp"),
    ):
        with pytest.raises(ConfigError, match=message):
            check(load_config(SMOKE, [arg for arg in RULE if arg != "--set"] + settings))
    check(load_config(SMOKE, [arg for arg in RULE if arg != "--set"] + ["ppo.critic=tiny-random-smollm2"]))


@pytest.mark.parametrize("settings, message", [
    (["peft.method=prefix", "peft.options={}"], "peft.method=prefix is not supported by ppo"),
    (["ppo.trainer.mini_batch_size=3"], "mini_batch_size to divide rollout_batch_size"),
    (["ppo.trainer.critic_warmup_steps=2", "ppo.trainer.max_steps=2"], "critic_warmup_steps < max_steps (2 of 2"),
    (["ppo.reward.function="], "ppo.reward.function ('module:function') is required"),
])
def test_what_ppo_cannot_do_is_refused_before_any_compute(tmp_path, settings, message):
    run_dir = tmp_path / "run"
    sets = [arg for setting in settings for arg in ("--set", setting)]
    result = run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "ppo", *RULE, *sets,
                          check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.replace("\n", " ")
    assert not (run_dir / "ppo").exists()
