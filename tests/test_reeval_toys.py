"""benchmarks/reeval_toys.py: saved toy decompositions re-evaluated on shared batches, on their own targets only."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks.toy import save_toy, toy_sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_toys import seed_target  # noqa: E402
from reeval_toys import find_run, read_baselines, reevaluate  # noqa: E402


@pytest.fixture(scope="module")
def runs(tms52, tmp_path_factory):
    """A bench_toys-style root holding a short tms_5-2 decomposition of seed 0's target."""
    root = tmp_path_factory.mktemp("runs")
    cfg = dh.load_config("tms_5-2")
    cfg.train.faithfulness_warmup_steps, cfg.train.compile = 0, False
    dh.decompose(tms52, toy_sampler(tms52), config=cfg, steps=3, seed=0, out_dir=root / "tms_5-2-s0", progress=False)
    return root


def test_both_configs_see_the_same_batches_and_pgd_starts(runs):
    record = reevaluate(["tms_5-2", "tms_5-2"], 0, [runs], batches=3)
    assert record["pgd_probe_difference"] == [0.0, 0.0] and record["ci_l0_difference"] == [0.0, 0.0]
    pgd, se = record["tms_5-2"]["pgd_probe"]
    assert pgd > 0 and se > 0  # three different batches
    assert record["rows"] == dh.load_config("tms_5-2").train.batch_size
    assert record["pgd_scope"] == ["unique_per_datapoint"] * 2  # the config's own


def test_pgd_scope_overrides_the_configs(runs):
    own = reevaluate(["tms_5-2", "tms_5-2"], 0, [runs], batches=2)
    shared = reevaluate(["tms_5-2", "tms_5-2"], 0, [runs], batches=2, pgd_scope="shared_across_batch")
    assert shared["pgd_scope"] == ["shared_across_batch"] * 2
    assert shared["ci_l0_difference"] == [0.0, 0.0] and shared["tms_5-2"]["ci_l0"] == own["tms_5-2"]["ci_l0"]
    assert shared["tms_5-2"]["pgd_probe"][0] != own["tms_5-2"]["pgd_probe"][0]  # one source per site, not per row


def test_refuses_a_decomposition_of_another_seeds_target(runs):
    (runs / "tms_5-2-s1").symlink_to(runs / "tms_5-2-s0")
    with pytest.raises(dh.FingerprintError):
        reevaluate(["tms_5-2", "tms_5-2"], 1, [runs], batches=2)


def test_names_the_missing_run_and_how_to_make_it(runs):
    with pytest.raises(SystemExit, match="no tms_5-2-s7/decomposition.*bench_toys.py tms_5-2 --first-seed 7"):
        find_run("tms_5-2", 7, [runs])


def test_a_baseline_record_stands_in_for_its_decomposition(runs, tmp_path):
    """Batches and PGD starts follow the seed and batch index only, so a later evaluation repeats the recorded figures;
    the differences are then of the means with unpaired standard errors, and a record of other batches is refused."""
    earlier = reevaluate(["tms_5-2", "tms_5-2"], 0, [runs], batches=2, pgd_scope="shared_across_batch")
    path = tmp_path / "baseline.jsonl"
    path.write_text(json.dumps(earlier) + "\n")
    baseline = read_baselines(str(path), range(0, 1))[0]
    later = reevaluate(["tms_5-2", "tms_5-2"], 0, [runs], batches=2, pgd_scope="shared_across_batch", baseline=baseline)
    assert later["paired"] is False and later["tms_5-2"] == earlier["tms_5-2"] and later["bf16"] == [False, False]
    se = earlier["tms_5-2"]["pgd_probe"][1]
    assert later["pgd_probe_difference"] == [0.0, math.hypot(se, se)]
    with pytest.raises(SystemExit, match="not tms_5-2 on 3 batches"):
        reevaluate(["tms_5-2", "tms_5-2"], 0, [runs], batches=3, pgd_scope="shared_across_batch", baseline=baseline)
    with pytest.raises(SystemExit, match=r"no record of seed\(s\) \[1\]"):
        read_baselines(str(path), range(0, 2))


def other_bits(model):
    """The same toy with slightly other weights: what another machine's BLAS may train from the same seed."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    return other


def test_a_seeds_target_is_saved_once_and_reloaded(tms52, tmp_path):
    saved = tmp_path / "tms_5-2-s0" / "target"
    save_toy(other_bits(tms52), saved, preset="tms_5-2", seed=0)
    reloaded = seed_target("tms_5-2", 0, None, "cpu", saved)  # not retrained: the saved bits
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                  other_bits(tms52).state_dict().values()))
    with pytest.raises(SystemExit, match=r"holds the target tms_5-2 \(seed 0, steps None\), not tms_5-2 \(seed 1"):
        seed_target("tms_5-2", 1, None, "cpu", saved)
    fresh = seed_target("tms_5-2", 0, 30, "cpu", tmp_path / "short" / "target")
    assert json.loads((tmp_path / "short" / "target" / "toy.json").read_text())["steps"] == 30
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tms52.state_dict().values()))


def test_the_target_saved_beside_a_run_is_the_one_evaluated(tms52, tmp_path):
    """A run made on another machine is evaluated on its own saved target; a retrained one would be refused."""
    target = other_bits(tms52)
    cfg = dh.load_config("tms_5-2")
    cfg.train.faithfulness_warmup_steps, cfg.train.compile = 0, False
    dh.decompose(target, toy_sampler(target), config=cfg, steps=3, seed=0, out_dir=tmp_path / "tms_5-2-s0",
                 progress=False)
    save_toy(target, tmp_path / "tms_5-2-s0" / "target", preset="tms_5-2", seed=0)
    record = reevaluate(["tms_5-2", "tms_5-2"], 0, [tmp_path], batches=2)
    assert record["pgd_probe_difference"] == [0.0, 0.0] and record["tms_5-2"]["pgd_probe"][0] > 0
