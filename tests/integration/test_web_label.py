"""`python -m pipeline label --web`, driven in headless Chromium (Debian's, from tests/system_deps.sh) by Playwright:
people label, reload and carry on, label at once, disagree; model text stays text; an exposed server wants its token
and no other site can change labels. Only loopback traffic; no models (the pairs are ready-made)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import expect, sync_playwright

from pipeline.config import load_config
from reward.agreement import fleiss_kappa
from reward.annotators import annotators_dir
from reward.pairs import LabelStore, Pair, write_pairs

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (bash tests/system_deps.sh)")
SCRIPT = "<script>document.title = 'pwned'; window.pwned = 1;</script><img src=x onerror=\"window.pwned = 2\">"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def make_run(tmp_path: Path, n: int, *overrides: str) -> tuple[Path, list[Pair]]:
    """A run whose preferences stage judges `n` ready-made pairs by people; the second pair answers with a script."""
    run_dir = tmp_path / "run"
    pairs = [Pair.create([{"role": "user", "content": f"How do bees find flower {i}?"}], f"By smell ({i}).",
                         SCRIPT if i == 1 else f"By dancing ({i}).", f"pairs.jsonl:{i + 1}") for i in range(n)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p.prompt, "response_a": p.response_a,
                                              "response_b": p.response_b}) + "\n" for p in pairs))
    settings = [f"preferences.pairs={pairs_file}", "preferences.judge={type: human}", *overrides]
    config = load_config(ROOT / "configs" / "smoke.yaml", settings)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_pairs(run_dir / "preferences" / "pairs.jsonl", pairs)
    return run_dir, pairs


@contextmanager
def label_server(run_dir: Path, host: str = "127.0.0.1"):
    """`label --web` on a free port: yields the address it prints; stopped with Ctrl-C, it must exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "label", "--run-dir", str(run_dir), "--web",
                             "--host", host, "--port", "0"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    output = ""
    try:
        deadline = time.monotonic() + 60
        while "labelling page: " not in output:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"label --web did not start: {output}{proc.stderr.read()}")
            if select.select([proc.stderr], [], [], 1)[0]:
                output += proc.stderr.readline()
        yield re.search(r"labelling page: (\S+)", output)[1]
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, output + rest
    assert "labelling stopped:" in rest


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.errors = errors
    return page


def wait_progress(page, text: str) -> None:
    # Locator assertions, not wait_for_function: the page's Content-Security-Policy forbids the eval that needs.
    expect(page.locator("#progress")).to_contain_text(text, timeout=10_000)


def store_of(run_dir: Path, name: str) -> dict[str, str]:
    return {label.pair_id: label.winner for label in LabelStore(annotators_dir(run_dir) / f"{name}.jsonl").labels()}


def run_preferences(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(run_dir / "config.yaml"),
                           "--run-dir", str(run_dir), "--stage", "preferences"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_label_reload_continue_undo_then_the_stage_goes_on(browser, tmp_path):
    from PIL import Image, ImageStat

    run_dir, pairs = make_run(tmp_path, 4)
    waiting = run_preferences(run_dir)
    assert waiting.returncode != 0 and f"label --run-dir {run_dir} --web" in " ".join(waiting.stderr.split())

    with label_server(run_dir) as url:
        page = open_page(browser, url)
        page.fill("#who-name", "alice")
        page.press("#who-name", "Enter")  # the name form: every label is saved under it
        wait_progress(page, "alice: 0 labelled by you")
        assert page.text_content("#response-a") == pairs[0].response_a

        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        gray = Image.open(shot).convert("L")
        assert ImageStat.Stat(gray).var[0] > 100, "the screenshot is blank"
        assert len(gray.getcolors(maxcolors=1 << 16)) > 20, "the screenshot holds no text"

        page.keyboard.press("a")
        wait_progress(page, "1 labelled by you")
        page.click("button[data-choice='b']")
        wait_progress(page, "2 labelled by you")
        assert store_of(run_dir, "alice") == {pairs[0].id: "a", pairs[1].id: "b"}  # on disk as given

        page.reload()  # a closed tab or a reload loses nothing and asks nothing again
        wait_progress(page, "2 labelled by you")
        assert page.text_content("#response-a") == pairs[2].response_a
        page.fill("#comment", "both vague")
        page.keyboard.press("Escape")  # leave the comment box: keys label again
        page.keyboard.press("t")
        wait_progress(page, "3 labelled by you")
        page.keyboard.press("u")  # undo: the pair comes back, and off the disk
        wait_progress(page, "2 labelled by you")
        assert page.text_content("#response-a") == pairs[2].response_a
        assert pairs[2].id not in store_of(run_dir, "alice")
        page.keyboard.press("b")
        wait_progress(page, "3 labelled by you")
        page.keyboard.press("s")  # skipped: the last pair comes back at once, being the only one left
        expect(page.locator("#status")).to_contain_text("skipped")
        assert page.text_content("#response-a") == pairs[3].response_a
        page.keyboard.press("a")
        page.wait_for_selector("#done:not([hidden])")
        assert "Nothing left for you" in page.text_content("#done")
        assert page.errors == []

    labels = LabelStore(annotators_dir(run_dir) / "alice.jsonl").labels()
    assert [(label.pair_id, label.winner) for label in labels] == [
        (pairs[0].id, "a"), (pairs[1].id, "b"), (pairs[2].id, "b"), (pairs[3].id, "a")]
    assert labels[2].verdicts == {} and labels[0].judge == "alice"  # the comment went with the undone answer

    done = run_preferences(run_dir)  # the stage waited for these labels exactly as for the terminal's
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (run_dir / "preferences" / "final" / "preferences.jsonl").open()]
    assert [row["chosen"] for row in rows] == [pairs[0].response_a, pairs[1].response_b, pairs[2].response_b,
                                               pairs[3].response_a]


def test_two_annotators_at_once_disagree_and_a_third_breaks_the_tie(browser, tmp_path):
    run_dir, pairs = make_run(tmp_path, 3, "preferences.judge.overlap=1.0")
    answers = {"alice": "aba", "bob": "abb"}  # they split on the third pair
    with label_server(run_dir) as url:
        pages = {name: open_page(browser, f"{url}?annotator={name}") for name in answers}
        for name, page in pages.items():
            wait_progress(page, f"{name}: 0 labelled by you")
        for turn in range(3):  # in step, each in their own browser context
            for name, page in pages.items():
                shown = page.text_content("#response-a")
                page.keyboard.press(answers[name][[p.response_a for p in pairs].index(shown)])
                wait_progress(page, f"{turn + 1} labelled by you")
        for page in pages.values():
            page.wait_for_selector("#done:not([hidden])")
        assert "2 of 3 pairs done" in pages["alice"].text_content("#progress")

        carol = open_page(browser, f"{url}?annotator=carol")  # majority: the split goes to a third person
        wait_progress(carol, "carol: 0 labelled by you · 2 of 3 pairs done · 1 left for you")
        assert carol.text_content("#response-a") == pairs[2].response_a
        carol.keyboard.press("a")
        carol.wait_for_selector("#done:not([hidden])")
    assert store_of(run_dir, "carol") == {pairs[2].id: "a"}

    done = run_preferences(run_dir)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "preferences" / "stage.json").read_text())["metrics"]
    expected = fleiss_kappa([["a", "a"], ["b", "b"], ["a", "b", "a"]])
    assert metrics["annotators/kappa"] == pytest.approx(expected)
    assert metrics["annotators/shared_pairs"] == 3 and metrics["annotators/raw"] == pytest.approx(2 / 3)
    assert metrics["preferences/rows"] == 3
    agreement = json.loads((run_dir / "preferences" / "final" / "annotators.json").read_text())
    assert agreement["annotators"] == ["alice", "bob", "carol"]

    report = subprocess.run([sys.executable, "-m", "pipeline", "report", "--run-dir", str(run_dir)], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    text = (run_dir / "report.md").read_text()
    assert "Agreement between the 3 annotators (alice, bob, carol)" in text
    assert f"{expected:.3f}" in text


def cross_site_post(page, url: str, body: dict) -> int:
    """The status another site's form gets, posting `body` to `url` from the browser `page` is in."""
    attacker = page.context.new_page()
    start, end = json.dumps(body)[:-1], '}'  # text/plain form encoding: name=value, so the JSON is split at "="
    attacker.set_content(f"""<form method="post" action="{url}" enctype="text/plain">
        <input name='{start}, "x": "' value='"{end}'></form>""")
    with attacker.expect_response(lambda response: response.url == url) as posted:
        attacker.eval_on_selector("form", "form => form.submit()")
    return posted.value.status


def test_model_text_stays_text_and_other_sites_cannot_label(browser, tmp_path):
    run_dir, pairs = make_run(tmp_path, 2)
    with label_server(run_dir) as url:
        page = open_page(browser, f"{url}?annotator=alice")
        wait_progress(page, "alice: 0 labelled by you")
        page.keyboard.press("a")  # the script answers the second pair
        wait_progress(page, "1 labelled by you")
        assert page.text_content("#response-b") == SCRIPT  # as written, tags and all
        assert page.eval_on_selector("#response-b", "el => el.children.length") == 0  # no element made from it
        page.wait_for_timeout(300)  # time for an onerror to fire, had the <img> been made
        assert page.evaluate("window.pwned") is None and page.title() == "Preference labelling"

        # A page on another site that posts a label from the same browser is refused: it cannot send the CSRF token.
        assert cross_site_post(page, f"{url}api/answer",
                               {"annotator": "alice", "pair_id": pairs[1].id, "choice": "b"}) == 403
        assert request(f"{url}api/answer", {"annotator": "alice", "pair_id": pairs[1].id, "choice": "b"}) == 403
    assert store_of(run_dir, "alice") == {pairs[0].id: "a"}


def request(url: str, data: dict | None = None, headers: dict | None = None) -> int:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_exposed_server_wants_its_token_and_other_sites_cannot_label(browser, tmp_path):
    run_dir, pairs = make_run(tmp_path, 2)
    with label_server(run_dir, host="0.0.0.0") as printed:
        token = re.search(r"token=([\w-]+)", printed)[1]
        base = re.sub(r"//[^/]+:", "//127.0.0.1:", printed.split("?")[0])  # only loopback traffic in tests
        answer = {"annotator": "mallory", "pair_id": pairs[0].id, "choice": "b"}
        assert request(base) == 401
        assert request(f"{base}api/next?annotator=mallory") == 401
        assert request(f"{base}api/answer", answer) == 401
        assert request(f"{base}api/next?annotator=mallory&token=wrong") == 401
        assert request(f"{base}api/answer", answer, {"Authorization": f"Bearer {token}"}) == 403  # no CSRF token

        page = open_page(browser, f"{base}?token={token}&annotator=alice")
        wait_progress(page, "alice: 0 labelled by you")
        page.keyboard.press("a")  # the page's own requests carry the token in its cookie
        wait_progress(page, "1 labelled by you")

        # Another site's form, posted from the browser that holds the token cookie: the same-site cookie stays home.
        assert cross_site_post(page, f"{base}api/answer",
                               {"annotator": "alice", "pair_id": pairs[1].id, "choice": "b"}) == 401
    assert store_of(run_dir, "alice") == {pairs[0].id: "a"}
    assert not (annotators_dir(run_dir) / "mallory.jsonl").exists()
