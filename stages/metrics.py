"""Evaluation measures the stages share: perplexity, the overfitting rule, overlap with reference answers, F1."""

from __future__ import annotations

import math

# Held-out loss must rise by more than this fraction above its best to count: tiny models wobble by less.
OVERFIT_TOLERANCE = 0.01


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); capped where exp overflows."""
    return math.exp(min(loss, 700.0))


def loss_curves(log_history: list[dict], eval_key: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, held-out `eval_key`) pairs from a trainer's log history."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    held_out = [(entry["step"], entry[eval_key]) for entry in log_history if eval_key in entry]
    return train, held_out


def overfitting(train: list[tuple[int, float]], held_out: list[tuple[int, float]]) -> bool:
    """Whether held-out loss rose after its best evaluation while training loss kept falling: the model learns its
    training set at the expense of text it has not seen. "Falling" compares the mean training loss over the second
    half of the steps logged between the best and the last evaluation with the mean over the first half (single
    steps are too noisy to compare)."""
    if len(held_out) < 2:
        return False
    best_step, best = min(held_out, key=lambda point: point[1])
    last_step, last = held_out[-1]
    if last_step <= best_step or last <= best * (1 + OVERFIT_TOLERANCE):
        return False
    span = [loss for step, loss in train if best_step < step <= last_step]
    if len(span) < 2:
        return False
    half = len(span) // 2
    return sum(span[half:]) / (len(span) - half) < sum(span[:half]) / half


def text_overlap(responses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu, its standard 13a tokenisation) and mean ROUGE-1 / ROUGE-L F1 (rouge-score, stemmed)
    of responses against one reference each; both on a 0-1 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(responses, [references]).score / 100
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, response) for response, reference in zip(responses, references)]
    return {"bleu": bleu, "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores)}


def binary_f1(predicted: list[bool], actual: list[bool]) -> float | None:
    """F1 of the positive class; None when there is no positive to find and none was predicted."""
    true_pos = sum(p and a for p, a in zip(predicted, actual))
    denominator = sum(predicted) + sum(actual)
    return 2 * true_pos / denominator if denominator else None


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95% at z = 1.96) of a win rate of `wins` out of `n`; ties counted as half a win,
    which is the usual reading of a win rate and keeps the interval inside [0, 1]. None for n = 0."""
    if n == 0:
        return None
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# A response repeats itself when one word n-gram comes back this often: "Tip: Tip: Tip: ..." or a sentence looping.
REPEAT_NGRAM, REPEAT_TIMES = 3, 3


def is_degenerate(response: str) -> bool:
    """Whether some word REPEAT_NGRAM-gram occurs REPEAT_TIMES times or more: the loops a policy falls into when it
    hacks its reward (ordinary answers of a few sentences do not repeat three words three times)."""
    words = response.lower().split()
    counts: dict[tuple, int] = {}
    for i in range(len(words) - REPEAT_NGRAM + 1):
        gram = tuple(words[i:i + REPEAT_NGRAM])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= REPEAT_TIMES:
            return True
    return False


def classification(predicted: list[int], actual: list[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 (the unweighted mean of each label's F1, over the labels that occur in `actual` or
    `predicted`: a rare label counts as much as a common one) and the confusion matrix, confusion[actual][predicted]."""
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for p, a in zip(predicted, actual):
        confusion[a][p] += 1
    f1s = []
    for label in range(num_labels):
        true_pos = confusion[label][label]
        predicted_as = sum(row[label] for row in confusion)
        support = sum(confusion[label])
        if predicted_as + support:
            f1s.append(2 * true_pos / (predicted_as + support))
    correct = sum(confusion[i][i] for i in range(num_labels))
    return {"accuracy": correct / len(actual) if actual else None,
            "macro_f1": sum(f1s) / len(f1s) if f1s else None, "confusion": confusion}
