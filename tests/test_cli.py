"""The decomp-hooks command: help on every command, a short toy run end to end, and clear errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from decomp_hooks.config import config_path
from decomp_hooks.cli import main


@pytest.mark.parametrize("args", [[], ["decompose"], ["toy"], ["toy", "train"], ["toy", "list"]])
def test_help_everywhere(args):
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_decompose_writes_a_run_directory(tmp_path):
    cfg = tmp_path / "tms.yaml"
    cfg.write_text((config_path("tms_5-2").read_text()).replace("steps: 10000", "steps: 40")
                   .replace("log_every: 500", "log_every: 10").replace("eval_every: 2500", "eval_every: 20"))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["decompose", str(cfg), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "mmcs" in result.output and "ground truth (" in result.output and "meaning" in result.output
    for name in ("config.yaml", "metrics.jsonl", "decomposition/decomposition.json", "target/toy.json",
                 "ci_linear1.png", "components_linear2.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40 and "eval/mmcs" in records[-1]
    again = CliRunner().invoke(main, ["decompose", str(cfg), "--out", str(out), "--no-progress"])
    assert again.exit_code == 1 and "already holds a run; pass resume=True (CLI: --resume RUN_DIR)" in again.output
    resumed = CliRunner().invoke(main, ["decompose", str(cfg), "--resume", str(out), "--no-progress"])
    assert resumed.exit_code == 0 and "mmcs" in resumed.output  # a finished run resumes to its end at once


def test_bad_config_is_a_usage_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("target: {toy: tms_5-2}\ntrain: {stpes: 3}\n")
    result = CliRunner().invoke(main, ["decompose", str(cfg)])
    assert result.exit_code == 2 and "Did you mean 'steps'" in result.output


def test_toy_train_and_unknown_name(tmp_path):
    result = CliRunner().invoke(main, ["toy", "train", "tms_40-10-apd", "--steps", "20", "--seed", "2", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0 and (tmp_path / "t" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "t" / "toy.json").read_text())  # named as trained, not as the first 40-10 preset
    assert (meta["preset"], meta["seed"]) == ("tms_40-10-apd", 2)
    bad = CliRunner().invoke(main, ["toy", "train", "tms_7-3", "--out", str(tmp_path / "u")])
    assert bad.exit_code == 2 and "unknown toy 'tms_7-3'" in bad.output


DEVICE_COMMANDS = [["decompose"], ["export"], ["dashboard"], ["compare"], ["cluster"], ["lib"], ["toy", "train"]]
DEVICE_RULE = "Torch device (default: cuda if available, else cpu)."


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_a_bad_device_is_a_usage_error_naming_it(command):
    result = CliRunner().invoke(main, [*command, "--device", "foo"])
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output and "'foo'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_every_command_states_the_same_device_rule(command):
    text = " ".join(CliRunner().invoke(main, [*command, "--help"]).output.split())
    assert "--device " in text and DEVICE_RULE in text


def test_cuda_without_cuda_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, ["toy", "train", "tms_5-2", "--out", "unused", "--device", "cuda"])
    assert result.exit_code == 2 and "'cuda' but CUDA is not available" in result.output


def test_lib_times_the_target_and_says_how_long_it_can_take_before_training_it(monkeypatch, tmp_path):
    import time

    from decomp_hooks.toy import modadd

    clock = {"t": 0.0}
    model = modadd.ModAddTransformer(modadd.ModAddConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32)).eval()

    def train(max_steps, **kwargs):  # 1 s to start, then 4 steps/s
        clock["t"] += 1.0 + max_steps / 4
        return model, {"steps": max_steps, "test_accuracy": 0.5}

    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(modadd, "train_modadd", train)
    cfg = tmp_path / "lib.yaml"
    cfg.write_text("target: {toy: modadd, steps: 480}\nablation_samples: 64\n"
                   "lib:\n  layers: [blocks.0.hook_resid_mid, blocks.0.hook_resid_post, output]\n"
                   "  last_position_from: blocks.0.hook_resid_mid\n  n_samples: 64\n  batch_size: 64\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["lib", str(cfg), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    first, timed = result.output.splitlines()[:2]
    assert "until test accuracy ≥ 0.99" in first and "at most 480 steps" in first
    assert timed.startswith("4.0 steps/s here: the 480-step cap takes 2 min") and str(out / "target") in timed
    assert (out / "target" / "toy.json").is_file()
