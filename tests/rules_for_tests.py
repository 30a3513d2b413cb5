"""Rule scorers for the tests, loaded by the `rule` judge as `rules_for_tests:<name>` (tests put this directory on
PYTHONPATH for the pipeline subprocesses)."""

import json
import os
import time


def shorter(prompt, response):
    return -float(len(response))


def slow_shorter(prompt, response):
    """Logs every call with the calling process id, then takes its time: a judge a test can kill mid-labelling."""
    with open(os.environ["RULE_CALL_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps({"pid": os.getpid(), "response": response}) + "\n")
    time.sleep(float(os.environ.get("RULE_DELAY", "0.3")))
    return -float(len(response))


def distinct_trigrams(prompt, response):
    """Share of the response's character trigrams that are distinct: 1 for no repetition, near 0 for a word said
    over and over. The tiny random model sampled at a low temperature repeats its first token, and can unlearn it."""
    grams = [response[i:i + 3] for i in range(len(response) - 2)]
    return len(set(grams)) / len(grams) if grams else 0.0
