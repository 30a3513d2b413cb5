"""LlmJudge and RewardModelJudge on the tiny random model: real forward passes, verdicts checked against invariants
(both orders, padding, position bias) and against single-example forward passes."""

import json
import math

import pytest
import torch
from conftest import with_large_random_weights

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.models import load_policy, load_reward_model
from pipeline.render import response_ids
from reward.judges import DEFAULT_RUBRIC
from reward.llm_judge import LlmJudge, label_token
from reward.pairs import Pair
from reward.rm_judge import RewardModelJudge

CFG = ModelConfig("tiny-random-smollm2")


def pairs() -> list[Pair]:
    # Different lengths, so batches mix padded and unpadded rows.
    prompt = [{"role": "user", "content": "Describe the sky."}]
    return [Pair.create(prompt, "Blue and wide.", "Blue.", "p.jsonl:1"),
            Pair.create(prompt, "Grey.", "Grey and low, with rain coming in from the west.", "p.jsonl:2"),
            Pair.create([{"role": "user", "content": "Hi"}], "Hello!", "Hey.", "p.jsonl:3"),
            Pair.create(prompt, "Dark at night, full of stars.", "Black.", "p.jsonl:4")]


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tokenizer):
    """The tiny model with larger random weights. With its own small ones it answers "A" to every prompt alike
    (all ties), which would leave the both-orders tests nothing to tell apart; these make p(A) depend on the text."""
    return with_large_random_weights(load_policy(tiny_model_dir, None, CFG, tokenizer), std=0.3, seed=0)


# ---------------------------------------------------------------------------- LLM judge

def test_label_tokens_are_what_the_reply_starts_with(tokenizer):
    a, b = label_token(tokenizer, "A"), label_token(tokenizer, "B")
    assert a != b
    text = tokenizer.apply_chat_template([{"role": "user", "content": "A or B?"}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text + "A", add_special_tokens=False)["input_ids"] == prompt + [a]


def test_a_letter_split_in_two_tokens_is_a_config_error():
    def splitting_tokenizer(text, add_special_tokens):
        return {"input_ids": [7, 8]}

    with pytest.raises(ConfigError, match="2 tokens"):
        label_token(splitting_tokenizer, "A")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_one_label_per_pair_from_both_orders(policy, tokenizer):
    given = []
    judge = LlmJudge(policy, tokenizer, batch_size=3, on_label=given.append)
    labels = judge.judge(pairs())
    assert [label.pair_id for label in labels] == [pair.id for pair in pairs()]
    assert given == labels
    for label in labels:
        json.dumps(label.to_dict())
        verdicts = label.verdicts
        assert set(verdicts) == {"ab", "ba", "p_a_first", "p_a_swapped", "strength", "position_bias"}
        assert verdicts["ab"] == ("a" if verdicts["p_a_first"] > 0.5 else "b")
        assert verdicts["ba"] == ("b" if verdicts["p_a_swapped"] > 0.5 else "a")
        # Plain reference: each order's log-odds = content + position; half their difference is the content.
        first, swapped = logit(verdicts["p_a_first"]), logit(verdicts["p_a_swapped"])
        assert verdicts["strength"] == pytest.approx((first - swapped) / 2, abs=1e-4)
        assert verdicts["position_bias"] == pytest.approx((first + swapped) / 2, abs=1e-4)
        assert label.winner == ("a" if first > swapped else "b")
        assert label.confidence == pytest.approx(1 / (1 + math.exp(-abs(first - swapped) / 2)), abs=1e-4)
        # The two orders' probabilities of this winner, combined in log-odds, not averaged.
        assert label.confidence > 0.5
    assert {"a", "b"} <= {label.winner for label in labels}
    assert any(label.verdicts["ab"] != label.verdicts["ba"] for label in labels), \
        "a pair whose orders disagree is decided by their strengths, not made a tie"


def test_tie_margin_ties_weak_preferences(policy, tokenizer):
    strengths = [abs(label.verdicts["strength"]) for label in LlmJudge(policy, tokenizer).judge(pairs())]
    margin = sorted(strengths)[1]
    labels = LlmJudge(policy, tokenizer, tie_margin=margin).judge(pairs())
    assert [label.winner == "tie" for label in labels] == [s <= margin for s in strengths]
    assert all(label.confidence == 0.5 for label in labels if label.winner == "tie")


def test_padding_does_not_change_verdicts(policy, tokenizer):
    alone = LlmJudge(policy, tokenizer, batch_size=1).judge(pairs())
    batched = LlmJudge(policy, tokenizer, batch_size=3).judge(pairs())
    assert [label.winner for label in alone] == [label.winner for label in batched]
    for one, many in zip(alone, batched):
        for key in ("p_a_first", "p_a_swapped"):
            assert one.verdicts[key] == pytest.approx(many.verdicts[key], abs=1e-5)


def test_a_position_prior_is_measured_and_removed(policy, tokenizer):
    """A judge pushed hard towards "A" in both orders gives the same winners and strengths as without the push;
    the push shows up, exactly, as its position bias."""
    a = label_token(tokenizer, "A")

    def favour_a(module, inputs, logits):
        logits = logits.clone()
        logits[..., a] += 50.0
        return logits

    plain = LlmJudge(policy, tokenizer).judge(pairs())
    hook = policy.lm_head.register_forward_hook(favour_a)
    try:
        pushed = LlmJudge(policy, tokenizer, batch_size=4).judge(pairs())
    finally:
        hook.remove()
    assert all(label.verdicts["ab"] == "a" and label.verdicts["ba"] == "b" for label in pushed)
    assert [label.winner for label in pushed] == [label.winner for label in plain]
    for before, after in zip(plain, pushed):
        assert after.verdicts["strength"] == pytest.approx(before.verdicts["strength"], abs=1e-3)
        assert after.verdicts["position_bias"] == pytest.approx(before.verdicts["position_bias"] + 50, abs=1e-3)


def test_rubric_and_principles_are_in_the_prompt(policy, tokenizer):
    pair = pairs()[0]

    def shown(judge: LlmJudge) -> str:
        return tokenizer.decode(judge.prompt(pair, pair.response_a, pair.response_b))

    assert DEFAULT_RUBRIC in shown(LlmJudge(policy, tokenizer))
    assert "Prefer short answers." in shown(LlmJudge(policy, tokenizer, rubric="Prefer short answers."))
    text = shown(LlmJudge(policy, tokenizer, rubric="ignored", principles=["Be brief.", "Be kind."]))
    assert "Judge by these principles:\n1. Be brief.\n2. Be kind." in text and "ignored" not in text
    assert "[Response A]\nBlue and wide.\n\n[Response B]\nBlue." in text
    assert text.endswith("Which response is better? Answer with A or B.<|im_end|>\n<|im_start|>assistant\n")


def test_an_over_long_pair_stays_unlabelled_with_a_warning(policy, tokenizer, capsys):
    probe = LlmJudge(policy, tokenizer)
    short, long = pairs()[2], pairs()[1]
    limit = max(len(probe.prompt(short, short.response_a, short.response_b)),
                len(probe.prompt(short, short.response_b, short.response_a)))
    judge = LlmJudge(policy, tokenizer, max_length=limit)
    labels = judge.judge([long, short])
    assert [label.pair_id for label in labels] == [short.id]
    assert judge.too_long == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "1 pairs" in err and "p.jsonl:2" in err and f"max_length={limit}" in err


# ---------------------------------------------------------------------------- reward-model judge

@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, CFG, tokenizer).eval()
    with torch.no_grad():  # a head large enough that rewards differ by more than rounding
        model.score.weight.normal_(0, 1.0)
    return model


def single_score(model, tokenizer, prompt, response) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([response_ids(tokenizer, prompt, response)])).logits[0, 0].item()


def test_score_equals_a_single_example_forward_at_any_batch_size(reward_model, tokenizer):
    prompts = [pair.prompt for pair in pairs()] * 2
    responses = [pair.response_a for pair in pairs()] + [pair.response_b for pair in pairs()]
    expected = [single_score(reward_model, tokenizer, p, r) for p, r in zip(prompts, responses)]
    for batch_size in (1, 4):
        got = RewardModelJudge(reward_model, tokenizer, batch_size=batch_size).score(prompts, responses)
        assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 4) for x in expected)) > 1


def test_reward_model_judge_picks_the_higher_score(reward_model, tokenizer):
    given = []
    judge = RewardModelJudge(reward_model, tokenizer, batch_size=3, on_label=given.append)
    labels = judge.judge(pairs())
    assert given == labels and [label.pair_id for label in labels] == [pair.id for pair in pairs()]
    for pair, label in zip(pairs(), labels):
        a, b = judge.score([pair.prompt, pair.prompt], [pair.response_a, pair.response_b])
        assert label.verdicts == {"scores": {"a": pytest.approx(a, abs=1e-5), "b": pytest.approx(b, abs=1e-5)}}
        assert label.winner == ("a" if a > b else "b")
        assert 0.5 < label.confidence < 1
        assert label.confidence == pytest.approx(1 / (1 + math.exp(-abs(a - b))), abs=1e-5)
        json.dumps(label.to_dict())


def test_differences_within_tie_margin_are_ties(reward_model, tokenizer):
    labels = RewardModelJudge(reward_model, tokenizer, tie_margin=1e6).judge(pairs())
    assert [(label.winner, label.confidence) for label in labels] == [("tie", 0.5)] * len(pairs())


def test_over_long_conversations_are_never_truncated(reward_model, tokenizer, capsys):
    short, long = pairs()[2], pairs()[1]
    limit = max(len(response_ids(tokenizer, short.prompt, text)) for text in (short.response_a, short.response_b))
    assert len(response_ids(tokenizer, long.prompt, long.response_b)) > limit
    judge = RewardModelJudge(reward_model, tokenizer, max_length=limit)
    labels = judge.judge([long, short])
    assert [label.pair_id for label in labels] == [short.id] and judge.too_long == 1
    assert "p.jsonl:2" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(PipelineError, match=f"max_length={limit}"):
        judge.score([long.prompt], [long.response_b])


def test_from_path_loads_the_judges(tiny_model_dir):
    pair = pairs()[2]
    llm = LlmJudge.from_path(tiny_model_dir, CFG, principles=["Be brief."], batch_size=2)
    rm = RewardModelJudge.from_path(tiny_model_dir, CFG, tie_margin=0.5)
    assert not llm.model.training and not rm.model.training
    assert "1. Be brief." in llm.rubric and rm.tie_margin == 0.5
    assert len(llm.judge([pair])) == len(rm.judge([pair])) == 1
