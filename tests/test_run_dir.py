"""A run directory has one writer: a second process is refused while the first runs; a run that fails before its
first checkpoint leaves nothing (a retry starts clean, and the error says no checkpoint was kept); a torn last line
of metrics.jsonl does not block resume."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import decomp_hooks as dh
from decomp_hooks.store import StoreError

CONFIG = {"targets": {"0": 4}, "losses": [{"type": "stochastic_recon"}, {"type": "importance_minimality", "coeff": 1e-3}],
          "train": {"steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 3, "checkpoint_every": 3,
                    "eval_pgd_steps": 0, "faithfulness_warmup_steps": 5}}

WRITER = """
import sys, time, torch
from torch import nn
import decomp_hooks as dh
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5))
def slow(n):
    time.sleep(0.2)
    return torch.rand(n, 5)
config = {"targets": {"0": 4}, "losses": [{"type": "stochastic_recon"}],
          "train": {"steps": 400, "batch_size": 8, "eval_pgd_steps": 0, "faithfulness_warmup_steps": 0,
                    "log_every": 1, "eval_every": 1000}}
dh.decompose(model, slow, config=config, out_dir=sys.argv[1], progress=False)
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5))


def sample(n: int) -> torch.Tensor:
    return torch.rand(n, 5)


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert first.poll() is None and time.time() < deadline, "the first writer never logged"
            time.sleep(0.1)
        with pytest.raises(StoreError, match=rf"being written by another process \(pid {first.pid}\)"):
            dh.decompose(mlp(), sample, config=CONFIG, out_dir=out, progress=False)
        assert first.poll() is None  # the refused call did not touch the running one
    finally:
        first.kill()
        first.wait()
    assert not (out / "checkpoints").exists()  # killed before its first checkpoint
    dh.decompose(mlp(), sample, config=CONFIG, out_dir=out, progress=False)  # kill -9 released the lock
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == 6  # none of the killed run's lines mixed in


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    bad = {**CONFIG, "train": {**CONFIG["train"], "lr": 1e30}}
    with pytest.raises(FloatingPointError, match="no checkpoint had been written yet, so nothing is kept"):
        dh.decompose(mlp(), lambda n: torch.full((n, 5), 1e30), config=bad, out_dir=out, progress=False)
    assert not out.exists()
    dh.decompose(mlp(), sample, config=CONFIG, out_dir=out, progress=False)  # the retry starts clean
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    out = tmp_path / "run"
    dh.decompose(mlp(), sample, config=CONFIG, steps=3, out_dir=out, progress=False)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/to')  # a writer killed mid-line
    dec = dh.decompose(mlp(), sample, config=CONFIG, out_dir=out, resume=True, progress=False)
    assert dec.final_metrics()["step"] == 6
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone


def test_force_replaces_only_what_this_tool_wrote_and_never_the_input(tmp_path):
    from click.testing import CliRunner

    from decomp_hooks.cli import main
    from decomp_hooks.toy import make_toy, save_toy, toy_sampler

    run = tmp_path / "run"
    model, _ = make_toy("tms_5-2", steps=50, progress=False)
    dh.decompose(model, toy_sampler(model), config={**CONFIG, "targets": {"linear1": 8}}, out_dir=run, progress=False)
    save_toy(model, run / "target")  # where the CLI finds a toy run's model
    export = ["export", str(run)]
    onto_input = CliRunner().invoke(main, [*export, str(run), "--force"])
    assert onto_input.exit_code == 1 and "which this command reads" in onto_input.output
    assert (run / "decomposition" / "decomposition.json").is_file()
    inside_input = CliRunner().invoke(main, [*export, str(tmp_path), "--force"])  # a folder holding the run
    assert inside_input.exit_code == 1 and (run / "checkpoints").is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    onto_users = CliRunner().invoke(main, [*export, str(mine), "--force"])
    assert onto_users.exit_code == 1 and "did not write" in onto_users.output
    assert (mine / "notes.txt").read_text() == "a user's file"
    out = tmp_path / "exports"
    assert CliRunner().invoke(main, [*export, str(out)]).exit_code == 0
    again = CliRunner().invoke(main, [*export, str(out), "--force"])  # an earlier export is ours: replaced
    assert again.exit_code == 0, again.output


def test_resume_refuses_a_changed_config_but_takes_more_steps(tmp_path):
    out = tmp_path / "run"
    dh.decompose(mlp(), sample, config=CONFIG, steps=3, out_dir=out, progress=False)
    for change, field in (({"train": {**CONFIG["train"], "lr": 0.5}}, "train.lr: 0.001 in the run, 0.5 now"),
                          ({"targets": {"0": 5}}, "targets.0: 4 in the run, 5 now")):
        with pytest.raises(StoreError, match=rf"changed config \({field}"):
            dh.decompose(mlp(), sample, config={**CONFIG, **change}, out_dir=out, resume=True, progress=False)
    dec = dh.decompose(mlp(), sample, config=CONFIG, steps=9, out_dir=out, resume=True, progress=False)
    assert dec.final_metrics()["step"] == 9 and "steps: 9" in (out / "config.yaml").read_text()  # records agree


def test_resume_checks_the_checkpoints_own_config_too(tmp_path):
    out = tmp_path / "run"
    dh.decompose(mlp(), sample, config=CONFIG, steps=3, out_dir=out, progress=False)
    edited = (out / "config.yaml").read_text().replace("lr: 0.001", "lr: 0.5")
    (out / "config.yaml").write_text(edited)  # config.yaml edited to match a changed config: the checkpoint knows
    changed = {**CONFIG, "train": {**CONFIG["train"], "lr": 0.5}}
    with pytest.raises(StoreError, match=r"changed config \(train.lr: 0.001 in the run, 0.5 now; from .*state.json"):
        dh.decompose(mlp(), sample, config=changed, out_dir=out, resume=True, progress=False)


def test_resume_on_other_arithmetic_warns_and_goes_on(tmp_path, monkeypatch):
    """A checkpoint records what it was computed in; resumed where the same config computes otherwise (a CPU
    without bf16 units, a GPU), the run continues with a warning naming both, and a like-for-like resume is silent."""
    import warnings

    from decomp_hooks.train import loop

    out = tmp_path / "run"
    dh.decompose(mlp(), sample, config=CONFIG, steps=3, out_dir=out, progress=False)
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["arithmetic"] == "cpu, fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dh.decompose(mlp(), sample, config=CONFIG, steps=6, out_dir=out, resume=True, progress=False)
    monkeypatch.setattr(loop, "arithmetic", lambda device, train: "cpu, bf16 autocast")
    with pytest.warns(UserWarning, match=r"computed in cpu, fp32 and this process computes in cpu, bf16 autocast"):
        dec = dh.decompose(mlp(), sample, config=CONFIG, steps=9, out_dir=out, resume=True, progress=False)
    assert dec.final_metrics()["step"] == 9


def test_files_and_folders_take_the_umask(tmp_path):
    import os

    from decomp_hooks.plots import plot_training_curves

    old = os.umask(0o027)
    try:
        dec = dh.decompose(mlp(), sample, config=CONFIG, out_dir=tmp_path / "run", progress=False)
        dec.save(tmp_path / "saved")
        plot_training_curves(dec.metrics, ["train/loss"], tmp_path / "run" / "curves.png")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o750 if (tmp_path / k).is_dir() else 0o640)}
    assert not wrong and any(k.endswith(".safetensors") for k in modes) and any(k.endswith(".png") for k in modes)


def test_writes_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(StoreError, match=r".lock' is a symbolic link; decomp-hooks does not write through links"):
        dh.decompose(mlp(), sample, config=CONFIG, out_dir=out, progress=False)
    (out / ".lock").unlink()
    (out / "metrics.jsonl").symlink_to(victim)  # a file rewritten whole: the link is replaced, never followed
    dh.decompose(mlp(), sample, config=CONFIG, out_dir=out, progress=False)
    assert victim.read_text() == "precious" and not (out / "metrics.jsonl").is_symlink()


def test_sigterm_stops_the_cli_cleanly_with_the_resume_command(tmp_path, spawn):
    import signal

    from decomp_hooks.config import config_path

    cfg = tmp_path / "tms.yaml"
    cfg.write_text(config_path("tms_5-2").read_text().replace("steps: 10000", "steps: 100000")
                   .replace("batch_size: 4096", "batch_size: 64").replace("checkpoint_every: 2500", "checkpoint_every: 20"))
    out = tmp_path / "run"
    proc = spawn([sys.executable, "-m", "decomp_hooks.cli", "decompose", str(cfg), "--out", str(out), "--no-progress"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not list((out / "checkpoints").glob("step-*")):  # glob of a missing folder is empty
        assert proc.poll() is None and time.time() < deadline, "the run never checkpointed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"to continue: decomp-hooks decompose {cfg} --resume {out}" in err
    assert list((out / "checkpoints").glob("step-*"))
