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
    assert "mmcs" in result.output and "ground-truth bars" in result.output
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
