"""stages.hf_trainer's reading of the trainer's own evaluations: no second pass over a held-out set the trainer has
just evaluated at its last step."""

from types import SimpleNamespace

from stages.hf_trainer import evaluated_at_start, final_evaluation


def _trainer(log_history: list, global_step: int):
    calls = []

    def evaluate():
        calls.append(global_step)
        return {"eval_loss": 9.0, "epoch": 1.0}

    return SimpleNamespace(state=SimpleNamespace(log_history=log_history, global_step=global_step),
                           evaluate=evaluate), calls


# Two held-out sets (cpt's domain and general text) log one entry each at the same step.
HISTORY = [{"eval_domain_loss": 3.0, "step": 0}, {"eval_general_loss": 4.0, "step": 0},
           {"loss": 2.9, "step": 4}, {"eval_domain_loss": 2.0, "step": 8}, {"eval_general_loss": 3.5, "step": 8}]


def test_the_evaluation_logged_at_the_last_step_is_taken_without_evaluating_again():
    trainer, calls = _trainer(HISTORY, 8)
    metrics = final_evaluation(trainer)
    assert calls == []
    assert metrics["eval_domain_loss"] == 2.0 and metrics["eval_general_loss"] == 3.5


def test_without_one_at_the_last_step_the_trainer_evaluates():
    trainer, calls = _trainer(HISTORY[:3], 6)  # evaluated at step 0 only; trained to step 6
    assert final_evaluation(trainer) == {"eval_loss": 9.0, "epoch": 1.0} and calls == [6]
    trainer, calls = _trainer([{"loss": 2.0, "step": 6}], 6)  # a training log at the last step is no evaluation
    final_evaluation(trainer)
    assert calls == [6]


def test_the_baseline_is_the_step_0_evaluation():
    trainer, _ = _trainer(HISTORY, 8)
    assert evaluated_at_start(trainer, {"eval/loss": "eval_domain_loss", "eval/general_loss": "eval_general_loss",
                                        "eval/missing": "eval_other_loss"}) == {"eval/loss": 3.0,
                                                                                "eval/general_loss": 4.0}
