"""The CPU thread rule (one thread for a toy step, the caller's count for big work, `train.threads` honoured and the
caller's count restored) and progress bars that redraw sparingly into a log file."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import decomp_hooks as dh
from decomp_hooks import progress
from decomp_hooks.adapters import resolve
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.progress import progress_bar
from decomp_hooks.toy import make_toy, toy_sampler
from decomp_hooks.train.runtime import ONE_THREAD_WORK, forward_work, positions, run_threads

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tms():
    model, _ = make_toy("tms_5-2", steps=1, progress=False)  # the shapes matter here, not the fit
    return model


def component_model(model: nn.Module, config: dict | str) -> tuple[ComponentModel, dh.DecomposeConfig]:
    cfg = dh.load_config(config)
    module, sites, cs = resolve(model, cfg.targets, cfg.identity_targets)
    return ComponentModel.from_config(module, sites, cs, cfg), cfg


def short_run(model: nn.Module, threads: int | None) -> dh.Decomposition:
    """Two steps of the shipped TMS 5-2 config (its batch of 4096 rows), recording the thread count in use."""
    cfg = dh.load_config("tms_5-2")
    cfg.train.compile, cfg.train.faithfulness_warmup_steps, cfg.train.log_every, cfg.train.threads = False, 0, 1, threads
    seen = lambda dec, step: {"threads_in_use": torch.get_num_threads()}  # noqa: E731
    return dh.decompose(model, toy_sampler(model), config=cfg, steps=2, progress=False, evaluate=seen)


def test_rule_picks_one_thread_for_tms_5_2_and_the_callers_count_for_big_work(tms):
    cm, cfg = component_model(tms, "tms_5-2")
    assert forward_work(cm, cfg.train.batch_size) < ONE_THREAD_WORK
    assert run_threads(cm, CPU, cfg.train, cfg.train.batch_size) == 1
    assert run_threads(cm, torch.device("cuda"), cfg.train, cfg.train.batch_size) == torch.get_num_threads()
    big, big_cfg = component_model(nn.Sequential(nn.Linear(2048, 2048)), {"targets": {"0": 64}})
    assert forward_work(big, big_cfg.train.batch_size) >= ONE_THREAD_WORK
    torch.set_num_threads(2)
    assert run_threads(big, CPU, big_cfg.train, big_cfg.train.batch_size) == 2


def test_positions_count_tokens_and_input_vectors():
    ids = torch.zeros(8, 64, dtype=torch.long)
    assert positions(ids) == positions({"input_ids": ids, "labels": ids}) == 512
    assert positions(torch.zeros(4096, 5)) == positions((torch.zeros(4096, 5), torch.zeros(4096))) == 4096
    assert positions(torch.zeros(2, 16, 32)) == 32  # embedded tokens


def test_a_run_chooses_its_threads_and_restores_the_callers(tms):
    torch.set_num_threads(2)
    dec = short_run(tms, threads=None)
    assert torch.get_num_threads() == 2
    assert [r["threads"] for r in dec.metrics if "threads" in r] == [1, 1]
    assert dec.metrics[-1]["eval/threads_in_use"] == 1


def test_train_threads_is_honoured(tms):
    dec = short_run(tms, threads=2)
    assert torch.get_num_threads() == 1  # the caller's (tests run on one thread)
    assert dec.metrics[-1]["eval/threads_in_use"] == 2 and dec.metrics[0]["threads"] == 2


def test_progress_bar_redraws_sparingly_when_not_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = progress_bar(total=10_000, desc="decompose")
    assert bar.mininterval == progress.LOG_INTERVAL_S
    for _ in range(10_000):
        bar.update(1)
    bar.close()
    assert log.getvalue().count("decompose") <= 3  # the first draw and the last, not one a step


def test_progress_bar_keeps_tqdms_defaults_in_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(log, "isatty", lambda: True)
    monkeypatch.setattr("sys.stderr", log)
    bar = progress_bar(range(3), desc="decompose")
    assert bar.mininterval == 0.1
    bar.close()
