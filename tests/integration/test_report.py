"""The alignment report of a small smoke run (preferences -> rm -> dpo, iterative_dpo and ppo, two steps each): `run`
writes report.md and report.html with every section and the numbers of stage.json; a partial run still reports; the
HTML stands alone and renders in headless Chromium with every image decoded."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, run_pipeline

from pipeline.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")
# grpo and rloo stay off (their report sections: tests/integration/test_online.py); iterative_dpo, off in smoke.yaml,
# runs for its rounds section.
SMALL = ["--set", "cpt.enabled=false", "--set", "sft.enabled=false", "--set", "iterative_dpo.enabled=true",
         "--set", "preferences.compare_with=data/preferences/beekeeping_pairs.jsonl",
         "--set", "rm.trainer.max_steps=2", "--set", "dpo.trainer.max_steps=2", "--set", "ppo.trainer.max_steps=2",
         "--set", "dpo.data.eval_split=0.03",  # dpo evaluates its held-out pairs before and after: keep them few
         "--set", "evaluation.max_prompts=2"]
SECTIONS = ["Did it align?", "Stages", "Training curves", "Preference labels and judge agreement", "Reward model calibration",
            "Iterative DPO: rounds", "PPO: reward and KL", "Win rate over the starting policy",
            "Sample generations, before and after"]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread per run on a shared CPU: see tests/integration/test_ppo.py
        run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), *SMALL)
    return run_dir


def manifests(run_dir: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in run_dir.glob("*/stage.json")}


def _md(text: str) -> str:
    """Text as a Markdown table cell holds it."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table row whose first cell is `first_cell`, in order."""
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in markdown.splitlines()
            if line.startswith(f"| {first_cell} |")]


def table_row(markdown: str, first_cell: str) -> list[str]:
    [row] = table_rows(markdown, first_cell)
    return row


def test_run_writes_every_section_with_the_manifests_numbers(run_dir):
    markdown, page = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ")] == SECTIONS
    assert not list(run_dir.glob(".report*.tmp")), "written through a temporary file, renamed into place"
    stages = manifests(run_dir)
    assert sorted(stages) == ["dpo", "iterative_dpo", "ppo", "preferences", "rm"]
    # The headline: each policy stage's win rate under its judge, with the 95% interval and the verdict.
    headline = markdown[:markdown.index("## Stages")]
    for name in ("dpo", "ppo"):
        metrics = stages[name]["metrics"]
        [row] = table_rows(headline, name)
        assert row[2:4] == [f"{metrics['eval/win_rate']:.1%}",
                            f"{metrics['eval/win_rate_low']:.1%} – {metrics['eval/win_rate_high']:.1%}"]
        assert row[4] in ("better", "worse", "no clear difference")
    markdown = markdown[markdown.index("## Stages"):]  # below, the tables after the headline
    for name, manifest in stages.items():
        metrics = manifest["metrics"]
        row = table_rows(markdown, name)[0]  # the stages table comes first
        assert row[1] == "completed"
        assert row[3] == str(metrics.get("train/steps", "–"))
        if "train/loss" in metrics:
            assert row[4] == f"{metrics['train/loss']:.4f}"
    rm, dpo, ppo, prefs = (stages[name]["metrics"] for name in ("rm", "dpo", "ppo", "preferences"))
    assert f"{rm['rm/eval_accuracy_before']:.4f} → {rm['rm/eval_accuracy']:.3f}" in table_row(markdown, "rm")[5]
    probe = f"On the probe 'cue' (pairs built so that a surface cue points to the rejected answer): accuracy " \
            f"{rm['rm/probe_cue_accuracy_before']:.3f} → {rm['rm/probe_cue_accuracy']:.3f}."
    assert probe in headline and probe in markdown  # in the headline and under the calibration
    assert f"{prefs['preferences/rows']} pairs, {prefs['preferences/ties']} ties" in table_row(markdown, "preferences")[5]
    for name, metrics in (("dpo", dpo), ("ppo", ppo)):
        _, win = table_rows(markdown, name)  # the stages table's row, then the win-rate table's
        assert win[2:5] == [f"{metrics['eval/win_rate']:.1%}",
                            f"{metrics['eval/wins']} / {metrics['eval/ties']} / {metrics['eval/losses']}",
                            f"{metrics['eval/kl_to_start']:.3f}"]
    assert f"| raw agreement | {prefs['agreement/raw']:.3f} |" in markdown
    assert table_row(markdown, "held-out score, before → after")[1] == (
        f"{ppo['eval/score_mean_before']:.4f} → {ppo['eval/score_mean']:.4f}")
    last_table = json.loads((run_dir / "ppo" / "samples.jsonl").read_text().splitlines()[-1])
    assert f"Responses sampled at iteration {last_table['step']}" in markdown
    assert table_row(markdown, _md(last_table["samples"][0]["prompt"][-1]["content"]))[2] == (
        f"{last_table['samples'][0]['score']:.3f}")
    for k in (1, 2):  # iterative_dpo's rounds, from their round.json
        done = json.loads((run_dir / "iterative_dpo" / f"round_{k}" / "round.json").read_text())
        assert table_row(markdown, str(k))[1:4] == [str(done["prompts"]), str(done["pairs/judged"]),
                                                    str(done["pairs/decided"])]
        assert table_row(markdown, str(k))[10] == f"{done['win/win_rate']:.1%}"
    calibration = json.loads((run_dir / "rm" / "calibration.json").read_text())["bins"]
    assert sum(int(table_row(markdown, b["confidence"])[1]) for b in calibration) == rm["data/eval_pairs"]
    first = json.loads((run_dir / "dpo" / "eval_samples.jsonl").read_text().splitlines()[0])
    assert _md(first["policy"]) in markdown

    # The HTML holds the same tables, its plots inlined as PNGs, and nothing it would have to fetch.
    for cell in (f"{rm['rm/eval_accuracy']:.3f}", f"{dpo['eval/win_rate']:.1%}", f"{ppo['eval/score_mean']:.4f}"):
        assert cell in page
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']*)'>", page)
    assert [alt for alt, _ in images] == ["loss per stage", "judge agreement", "reliability diagram",
                                          "iterative DPO by round", "PPO per iteration", "win rates"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for _, data in images)
    assert not re.search(r"<(script|link|iframe)|(src|href)=['\"]?(https?:|//)", page, re.IGNORECASE)


def test_a_partial_run_reports_what_it_has(run_dir, tmp_path, capsys):
    """rm interrupted after its first logged step (no final metrics, no calibration), dpo failed before its
    evaluation, ppo never run: the report keeps what is there and leaves the rest out."""
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("base", "checkpoints", "*.safetensors"))
    shutil.rmtree(partial / "ppo")
    shutil.rmtree(partial / "iterative_dpo")
    (partial / "dpo" / "eval_samples.jsonl").unlink()
    (partial / "rm" / "calibration.json").unlink()
    for name, update in (("rm", {"status": "running"}), ("dpo", {"status": "failed", "error": "out of memory"})):
        manifest = json.loads((partial / name / "stage.json").read_text())
        manifest.update(update, metrics={}, duration_s=None)
        (partial / name / "stage.json").write_text(json.dumps(manifest))
    metrics_file = partial / "rm" / "metrics.jsonl"
    metrics_file.write_text(metrics_file.read_text().splitlines()[0] + "\n" + '{"step": 2, "lo')  # torn last line
    (partial / "report.md").unlink()

    assert main(["report", "--run-dir", str(partial)]) == 0
    assert capsys.readouterr().out.split() == [str(partial / "report.md"), str(partial / "report.html")]
    markdown = (partial / "report.md").read_text()
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ")] == [
        "Stages", "Training curves", "Preference labels and judge agreement"]
    # No process holds the run's lock, so the 'running' rm was interrupted; its steps so far come from its log.
    assert table_row(markdown, "rm")[1:4] == ["interrupted", "–", "1 so far"]
    assert table_row(markdown, "dpo")[1] == "failed" and "dpo stopped with: out of memory" in markdown
    assert "| ppo |" not in markdown

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--run-dir", str(empty)]) == 2
    assert "nothing to report: no stage has run" in capsys.readouterr().err


PROBE = """<script>
const failed = [];
addEventListener("error", event => failed.push(event.target.alt || event.message || "error"), true);
addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.alt);
  const result = document.createElement("pre");
  result.id = "probe";
  result.textContent = JSON.stringify({images: images.length, broken, failed});
  document.body.append(result);
});
</script>"""


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                           f"--user-data-dir={user_data}", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian: apt-get install chromium; "
                                                  ".ci/run installs it)")
def test_the_html_renders_in_headless_chromium(run_dir, tmp_path):
    # The report as it is, plus a probe that records load errors and whether every image decoded.
    probed = tmp_path / "probed.html"
    probed.write_text((run_dir / "report.html").read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), user_data=tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert found, f"the probe never ran:\n{dom.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe == {"images": 6, "broken": [], "failed": []}

    shot = tmp_path / "report.png"
    chromium("--window-size=1280,2400", f"--screenshot={shot}", (run_dir / "report.html").as_uri(),
             user_data=tmp_path / "profile")
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert image.size == (1280, 2400)
    assert len(colours) > 100, "the page drew text and plots, not a blank canvas"


def test_dpo_and_ppo_are_compared_with_the_same_start_responses_sampled_once(run_dir):
    """Both start from the same policy and are evaluated on the same prompts: one file of start responses, shared."""
    [shared] = list((run_dir / "eval_start_samples").iterdir())
    sampled = [json.loads(line) for line in shared.read_text().splitlines()]
    start = [response for batch in sampled for responses in batch["responses"] for response in responses]
    for stage in ("dpo", "ppo"):
        samples = [json.loads(line) for line in (run_dir / stage / "eval_samples.jsonl").read_text().splitlines()]
        assert [sample["start"] for sample in samples] == start
