"""ApiJudge against a real HTTP server on 127.0.0.1: the retries, headers and errors are the ones urllib sees."""

import socket
import time

import pytest
from judge_server import start_server, stop_server

from pipeline.errors import ConfigError, PipelineError
from reward.api_judge import ApiJudge, ApiJudgeConfig, parse_answer
from reward.pairs import LabelStore, Pair, preference_rows, write_preferences

KEY = "sk-test-9f8e7d6c5b4a-secret"
PROMPT = [{"role": "user", "content": "Is honey good?"}]


@pytest.fixture
def server():
    httpd = start_server()
    yield httpd
    stop_server(httpd)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)


def make_judge(url: str, **options) -> ApiJudge:
    options = {"max_concurrency": 1, "backoff": 0.01, "max_retries": 3, "timeout": 5.0, **options}
    return ApiJudge(ApiJudgeConfig(base_url=url, model="judge-model-x", api_key_env="JUDGE_TEST_KEY", **options))


def good_pair(n: int = 0) -> Pair:
    return Pair.create(PROMPT, f"Honey is sticky ({n}).", f"Honey is good food ({n}).", f"prompts.jsonl:{n + 1}")


def test_retries_429_then_500_then_labels(server):
    server.script = [(429, {"Retry-After": "0"}, "slow down"), (500, {}, "oops")]
    finished = []
    judge = make_judge(server.url)
    judge.on_label = finished.append
    [label] = judge.judge([good_pair()])
    assert label.winner == "b" and label.verdicts == {"ab": "b", "ba": "b"} and label.judge == "api:judge-model-x"
    assert finished == [label]
    assert len(server.requests) == 4  # three tries of the first order, one of the swapped order


def test_request_carries_bearer_key_model_and_both_orders(server):
    pair = good_pair()
    make_judge(server.url, rubric="Prefer honesty.").judge([pair])
    first, swapped = server.requests
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "judge-model-x" and first["body"]["temperature"] == 0.0
    assert "Prefer honesty." in first["body"]["messages"][0]["content"]
    question, swapped_question = first["body"]["messages"][-1]["content"], swapped["body"]["messages"][-1]["content"]
    assert question.index(pair.response_a) < question.index(pair.response_b)
    assert swapped_question.index(pair.response_b) < swapped_question.index(pair.response_a)


def test_a_judge_that_picks_a_position_gives_ties(server):
    server.always = "A"
    labels = make_judge(server.url, max_concurrency=4).judge([good_pair(i) for i in range(3)])
    assert [label.winner for label in labels] == ["tie"] * 3
    assert labels[0].verdicts == {"ab": "a", "ba": "b"}


def test_retry_after_is_honoured_over_backoff(server):
    server.script = [(429, {"Retry-After": "0"}, "")]
    start = time.monotonic()
    make_judge(server.url, backoff=30.0, max_retries=1).judge([good_pair()])
    assert time.monotonic() - start < 10


def test_timeout_is_retried(server):
    server.script = [("sleep", 1.0)]
    [label] = make_judge(server.url, timeout=0.3).judge([good_pair()])
    assert label.winner == "b"


def test_gives_up_after_retries_naming_url_and_status(server):
    server.script = [(503, {}, "busy")] * 3
    with pytest.raises(PipelineError) as info:
        make_judge(server.url, max_retries=2).judge([good_pair()])
    message = str(info.value)
    assert f"{server.url}/chat/completions" in message and "HTTP 503" in message and "3 attempts" in message


def test_client_errors_are_not_retried_and_the_key_is_redacted(server):
    server.script = [(401, {}, f"Incorrect API key provided: {KEY}")]
    with pytest.raises(PipelineError, match="HTTP 401") as info:
        make_judge(server.url).judge([good_pair()])
    assert KEY not in str(info.value)
    first = server.requests[0]["body"]
    assert sum(request["body"] == first for request in server.requests) == 1  # not retried


def test_server_down_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again at the end of the block: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(PipelineError) as info:
        make_judge(url, max_retries=2, backoff=0.001).judge([good_pair()])
    message = str(info.value)
    assert f"{url}/chat/completions" in message and "3 attempts" in message and "refused" in message.lower()


def test_unreadable_answer_leaves_the_pair_unlabelled(server, capsys):
    server.always = "I cannot decide."
    assert make_judge(server.url).judge([good_pair()]) == []
    assert "no A/B answer" in " ".join(capsys.readouterr().err.split())


def test_missing_key_fails_in_setup(server, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(ConfigError, match="JUDGE_TEST_KEY"):
        make_judge(server.url)


def test_key_is_never_stored_or_written(server, tmp_path):
    judge = make_judge(server.url)
    assert KEY not in repr(judge) and KEY not in str(vars(judge)) and KEY not in repr(judge.config)
    pairs = [good_pair(i) for i in range(3)]
    with LabelStore(tmp_path / "run" / "labels.jsonl") as store:
        judge.on_label = store.add
        judge.judge(pairs)
        rows, _ = preference_rows(pairs, store.labels())
    write_preferences(tmp_path / "run" / "preferences.jsonl", rows)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 2
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("b", "B"), (" **B** ", "B"), ("Response A.", "A"), ('"A"', "A"),
    ("Both", None), ("A or B", None), ("", None),
])
def test_parse_answer(text, letter):
    assert parse_answer(text) == letter
