"""Save/load round trips, refusal of other weights, damaged files, and resuming a killed run bit for bit."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks import store
from decomp_hooks.store import MARKER, StoreError
from decomp_hooks.toy import load_toy, save_toy, toy_sampler


@pytest.fixture
def saved(tms52, spd_config, tmp_path):
    dec = dh.decompose(tms52, toy_sampler(tms52), config=spd_config, steps=20, progress=False)
    save_toy(tms52, tmp_path / "target")
    return dec, dec.save(tmp_path / "decomposition")


def test_round_trip_gives_identical_ci_and_outputs(saved, tms52):
    dec, path = saved
    again = dh.load(path, model=load_toy(path.parent / "target"))
    x = toy_sampler(tms52)(64)
    for name in dec.site_names:
        assert torch.equal(dec.causal_importance(x)[name], again.causal_importance(x)[name])
        assert torch.equal(dec.components[name].weight(), again.components[name].weight())
    assert dh.load(path).config == dec.config  # finds the toy target saved beside it


def test_load_refuses_a_different_model(saved):
    _, path = saved
    other = load_toy(path.parent / "target")
    with torch.no_grad():
        other.linear1.weight.add_(0.01)
    with pytest.raises(dh.FingerprintError, match="site 'linear1'.*differs.*strict=False"):
        dh.load(path, model=other)
    assert dh.load(path, model=other, strict=False).site_names == ["linear1", "linear2"]


def flip_bit(path: Path, offset_from_end: int = 9) -> None:
    """Flip one bit of a file's tensor data (the data follows the header, so near the end is data)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_naming_the_file(saved):
    _, path = saved
    flip_bit(path / "decomposition.safetensors")
    with pytest.raises(StoreError, match=r"decomposition.safetensors' does not match the SHA-256 recorded in"):
        dh.load(path)


def test_nan_weights_are_refused_on_load(saved):
    _, path = saved
    (path / MARKER).unlink()  # a hand-made file: no manifest to catch it first
    tensors = store.read_tensors(path / "decomposition.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    store.write_tensors(path / "decomposition.safetensors", tensors)
    with pytest.raises(StoreError, match=rf"tensor '{name}' holds NaN or Inf"):
        dh.load(path)


def test_damaged_files_fail_clearly(saved):
    _, path = saved
    weights = path / "decomposition.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(StoreError, match="decomposition.safetensors' does not match the SHA-256"):
        dh.load(path)
    (path / MARKER).unlink()  # without the manifest, the format checks answer
    with pytest.raises(StoreError, match="truncated or corrupt"):
        dh.load(path)
    meta = path / "decomposition.json"
    meta.write_text(meta.read_text()[:-20])
    with pytest.raises(StoreError, match="not valid JSON"):
        dh.load(path)
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="not a decomp-hooks decomposition"):
        dh.load(path)
    meta.unlink()
    with pytest.raises(StoreError, match="missing file"):
        dh.load(path)


def test_existing_run_dir_needs_resume(tms52, spd_config, tmp_path):
    dh.decompose(tms52, toy_sampler(tms52), config=spd_config, out_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "decomposition" / "decomposition.json").is_file()
    with pytest.raises(StoreError, match="already holds a run; pass resume=True"):
        dh.decompose(tms52, toy_sampler(tms52), config=spd_config, out_dir=tmp_path / "run", progress=False)


RUN = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import decomp_hooks as dh
    from decomp_hooks.toy import load_toy, toy_sampler
    from tests.conftest import SPD_5_2 as cfg
    cfg["train"].update(steps=60, checkpoint_every=10, eval_every=25)
    model = load_toy(sys.argv[1])
    slow = sys.argv[3] == "slow"
    sampler = toy_sampler(model)
    data = (lambda n: (time.sleep(0.05), sampler(n))[1]) if slow else sampler
    dh.decompose(model, data, config=cfg, out_dir=sys.argv[2], resume=sys.argv[4] == "resume", progress=False)
""")


def run_script(spawn, tmp_path, *args):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return spawn([sys.executable, str(script), *map(str, args)], env=env, cwd=os.getcwd())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_bit_for_bit(tms52, tmp_path, sig, spawn):
    save_toy(tms52, tmp_path / "target")
    assert run_script(spawn, tmp_path, tmp_path / "target", tmp_path / "full", "fast", "new").wait(120) == 0
    proc = run_script(spawn, tmp_path, tmp_path / "target", tmp_path / "cut", "slow", "new")
    deadline = time.time() + 120
    while not list((tmp_path / "cut" / "checkpoints").glob("step-*0001*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # a random step between the first checkpoint and the end (60 steps × 0.05 s)
    proc.send_signal(sig)
    proc.wait(60)
    assert not (tmp_path / "cut" / "decomposition").exists()
    assert run_script(spawn, tmp_path, tmp_path / "target", tmp_path / "cut", "fast", "resume").wait(120) == 0
    full = dh.load(tmp_path / "full" / "decomposition", model=tms52)
    cut = dh.load(tmp_path / "cut" / "decomposition", model=tms52)
    for name in full.site_names:
        assert torch.equal(full.components[name].V, cut.components[name].V)
    assert torch.equal(full.cm.ci_fns["linear1"].w_out, cut.cm.ci_fns["linear1"].w_out)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full_steps = [json.loads(line)["step"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert steps == full_steps


def test_damaged_checkpoints_and_toys_fail_clearly(tms52, spd_config, tmp_path):
    dh.decompose(tms52, toy_sampler(tms52), config=spd_config, out_dir=tmp_path / "run", progress=False)
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    state = last / "state.safetensors"
    flip_bit(state)
    with pytest.raises(StoreError, match=r"state.safetensors' does not match the SHA-256 recorded"):
        dh.decompose(tms52, toy_sampler(tms52), config=spd_config, out_dir=tmp_path / "run", resume=True, progress=False)
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    (last / MARKER).unlink()
    with pytest.raises(StoreError, match=r"state.safetensors' is not a readable safetensors file.*truncated"):
        dh.decompose(tms52, toy_sampler(tms52), config=spd_config, out_dir=tmp_path / "run", resume=True, progress=False)
    save_toy(tms52, tmp_path / "toy")
    (tmp_path / "toy" / "toy.json").write_text('{"kind": "tms", "config": ')
    with pytest.raises(StoreError, match=r"toy.json' does not match the SHA-256"):
        load_toy(tmp_path / "toy")
    (tmp_path / "toy" / MARKER).unlink()
    with pytest.raises(StoreError, match=r"toy.json' is not valid JSON"):
        load_toy(tmp_path / "toy")
    (tmp_path / "toy" / "toy.json").unlink()
    with pytest.raises(StoreError, match=r"missing file .*toy.json"):
        load_toy(tmp_path / "toy")


def test_a_kill_between_the_two_renames_of_a_replacement_loses_nothing(tmp_path):
    """atomic_dir moves the old directory aside, then renames the new one in: killed in between, the next write (or
    a resume) puts the old one back first."""
    path = tmp_path / "out"
    with store.atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("old")
    aside = tmp_path / ".out.old.abc123"
    aside.mkdir()
    path.rename(aside / "x")  # the state a kill -9 between the renames leaves
    store.recover_dir(path)
    assert (path / "a.txt").read_text() == "old" and not aside.exists()
