"""ContrastiveJudge on the tiny random model: its scores against a plain reference computation (the log-likelihood
of the templated conversation minus that of its prompt, under each instruction), batching, length handling, labels."""

import math

import pytest
import torch
from conftest import with_large_random_weights

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.models import load_policy
from reward.contrastive_judge import ContrastiveJudge, instructions, with_system
from reward.pairs import Pair

CFG = ModelConfig("tiny-random-smollm2")
PROMPT = [{"role": "user", "content": "How warm must it be to open a hive?"}]


def pairs() -> list[Pair]:
    return [Pair.create(PROMPT, "About 15 °C, on a calm day.", "It depends.", "p.jsonl:1"),
            Pair.create(PROMPT, "Warm.", "Wait for a still, sunny afternoon above 15 degrees.", "p.jsonl:2"),
            Pair.create([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                        "Hello!", "Hey, how can I help with your bees today?", "p.jsonl:3")]


@pytest.fixture(scope="module")
def model(tiny_model_dir, tokenizer):
    """Larger random weights, so likelihoods differ by more than rounding between the two instructions."""
    return with_large_random_weights(load_policy(tiny_model_dir, None, CFG, tokenizer), std=0.3, seed=1)


def reference_logp(model, tokenizer, messages, response) -> tuple[float, int]:
    """log p(response's tokens and its end-of-turn | conversation so far), one example, no padding: the whole
    templated conversation scored token by token, counting only the tokens after the generation prompt."""
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    full = full.rstrip()  # the newline after <|im_end|> belongs to no turn
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(prefix_ids)] == prefix_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    total = sum(logp[t - 1, ids[t]].item() for t in range(len(prefix_ids), len(ids)))
    return total, len(ids) - len(prefix_ids)


@pytest.mark.parametrize("length_norm", ["sum", "mean"])
def test_scores_equal_the_plain_computation_at_any_batch_size(model, tokenizer, length_norm):
    judge = ContrastiveJudge(model, tokenizer, rubric="Give figures.", violation="Be vague.",
                             length_norm=length_norm)
    prompts = [pair.prompt for pair in pairs()] * 2
    responses = [pair.response_a for pair in pairs()] + [pair.response_b for pair in pairs()]
    expected = []
    for prompt, response in zip(prompts, responses):
        (follow, n), (violate, m) = (reference_logp(model, tokenizer, with_system(text, prompt), response)
                                     for text in (judge.follow, judge.violate))
        assert n == m
        expected.append((follow - violate) / (n if length_norm == "mean" else 1))
    for batch_size in (1, 3, 16):
        judge.batch_size = batch_size
        assert judge.score(prompts, responses) == pytest.approx(expected, abs=1e-4)
    assert len({round(x, 3) for x in expected}) == len(expected)


def test_the_instructions_come_from_the_rubric_or_the_constitution(model, tokenizer):
    follow, violate = instructions("Give figures.")
    assert "Give figures." in follow and "Give figures." in violate and "opposite" in violate
    assert instructions("Give figures.", "Be vague.") == (follow, "Be vague.")
    # Each side's own wording is used word for word, with no preamble.
    assert instructions("Give figures.", "Be vague.", "State the figure.") == ("State the figure.", "Be vague.")
    assert ContrastiveJudge(model, tokenizer, rubric="x", follow="State the figure.").follow == "State the figure."
    judge = ContrastiveJudge(model, tokenizer, principles=["Use digits.", "End with a tip."])
    assert "1. Use digits.\n2. End with a tip." in judge.follow and "1. Use digits." in judge.violate
    # A conversation's own system message is kept, after the judge's instruction.
    shown = with_system("Give figures.", pairs()[2].prompt)
    assert shown[0] == {"role": "system", "content": "Give figures.\n\nBe brief."} and shown[1:] == pairs()[2].prompt[1:]


def test_labels_compare_the_two_scores(model, tokenizer):
    given = []
    judge = ContrastiveJudge(model, tokenizer, violation="Be vague.", batch_size=4, on_label=given.append)
    labels = judge.judge(pairs())
    assert labels == given and [label.pair_id for label in labels] == [pair.id for pair in pairs()]
    for pair, label in zip(pairs(), labels):
        a, b = judge.score([pair.prompt, pair.prompt], [pair.response_a, pair.response_b])
        assert label.verdicts["scores"] == {"a": pytest.approx(a, abs=1e-4), "b": pytest.approx(b, abs=1e-4)}
        assert label.winner == ("a" if a > b else "b")
        assert label.confidence == pytest.approx(1 / (1 + math.exp(-abs(a - b))), abs=1e-4)
    ties = ContrastiveJudge(model, tokenizer, violation="Be vague.", tie_margin=1e6).judge(pairs())
    assert [(label.winner, label.confidence) for label in ties] == [("tie", 0.5)] * len(pairs())


def test_over_long_pairs_stay_unlabelled_and_scores_refuse_them(model, tokenizer, capsys):
    judge = ContrastiveJudge(model, tokenizer, violation="Be vague.")
    short, long = pairs()[0], pairs()[1]
    limit = max(len(judge.rendered(text, short.prompt, response)[0])
                for text in (judge.follow, judge.violate) for response in (short.response_a, short.response_b))
    judge.max_length = limit
    assert [label.pair_id for label in judge.judge([long, short])] == [short.id] and judge.too_long == 1
    assert "p.jsonl:2" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(PipelineError, match=f"max_length={limit}"):
        judge.score([long.prompt], [long.response_b])


def test_bad_options_are_config_errors(model, tokenizer):
    with pytest.raises(ConfigError, match="length_norm"):
        ContrastiveJudge(model, tokenizer, length_norm="max")
    with pytest.raises(ConfigError, match="tie_margin"):
        ContrastiveJudge(model, tokenizer, tie_margin=-1)
