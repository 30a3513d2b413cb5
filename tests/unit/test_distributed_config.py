"""The distributed section, the shipped DeepSpeed and accelerate files, and the launch command built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.launch import accelerate_command

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
ACCELERATE = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def _config(tmp_path, **distributed):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"sft": {"data": {"train": "data/sft/beekeeping_qa.jsonl"}},
                                    "distributed": distributed}))
    return load_config(path)


def test_zero2_zero3_and_offload_are_shipped_and_leave_the_trainer_values_auto():
    assert {p.name for p in DEEPSPEED} == {"zero2.json", "zero3.json", "zero3_offload.json"}
    for path in DEEPSPEED:
        ds = json.loads(path.read_text())
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", f"{path.name}: {key}"
        assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
    stages = {p.name: json.loads(p.read_text())["zero_optimization"]["stage"] for p in DEEPSPEED}
    assert stages == {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
    assert json.loads((REPO / "configs/deepspeed/zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"], "ZeRO-3 must gather the weights it saves"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type == "DEEPSPEED"
    assert (REPO / config.deepspeed_config["deepspeed_config_file"]).exists()


def test_defaults_launch_nothing(tmp_path):
    dist = _config(tmp_path).distributed
    assert (dist.world_size, dist.enabled) == (1, False)


@pytest.mark.parametrize("settings, message", [
    ({"num_processes": 0}, "at least 1"),
    ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"}, "machine_rank must be in [0, 2)"),
    ({"num_machines": 2}, "main_process_ip"),
    ({"deepspeed": "configs/deepspeed/zero4.json"}, "no DeepSpeed config at configs/deepspeed/zero4.json"),
])
def test_bad_settings_are_refused(tmp_path, monkeypatch, settings, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        _config(tmp_path, **settings)


def test_invalid_deepspeed_json_names_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 3}")
    with pytest.raises(ConfigError, match=f"{bad} is not valid JSON"):
        _config(tmp_path, deepspeed=str(bad))


def test_the_launch_command_carries_every_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    dist = _config(tmp_path, num_processes=8, num_machines=2, machine_rank=0, main_process_ip="10.0.0.1",
                   main_process_port=29501, deepspeed="configs/deepspeed/zero3.json").distributed
    command = accelerate_command(dist, Path("runs/x/sft/launch.json"))
    flags = dict(zip(command[3:-3:], command[4:-3:]))
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2" and flags["--machine_rank"] == "0"
    assert flags["--main_process_ip"] == "10.0.0.1" and flags["--main_process_port"] == "29501"
    assert flags["--deepspeed_config_file"] == str(REPO / "configs/deepspeed/zero3.json")
    assert "--use_deepspeed" in command and flags.get("--deepspeed_multinode_launcher") == "standard"
    assert command[-3:] == ["-m", "pipeline.launch", "runs/x/sft/launch.json"]
