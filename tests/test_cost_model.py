"""benchmarks/cost_model.py: the phases it finds in a step, and the work it counts in each."""
from __future__ import annotations

import sys
from pathlib import Path

import decomp_hooks as dh
from decomp_hooks.toy import toy_sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cost_model import Rates, count_step  # noqa: E402

ROWS = 64


def test_counts_the_target_forward_masked_forwards_and_ci_of_a_tms_step(tms52):
    cfg = dh.load_config("tms_5-2")
    cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps, cfg.train.compile = 0, 0, True
    dec = dh.decompose(tms52, toy_sampler(tms52), config=cfg, steps=1, progress=False)
    count = count_step(dec.cm, dec.method, toy_sampler(tms52)(ROWS))
    phases = {name: p for name, p in count.phases.items() if p.calls}
    assert list(phases) == ["target forward", "CI function forward", "masked forward (2 of 2 sites)",
                            "masked forward (1 of 2 sites)", "backward (every term, CI function included)"]
    assert phases["masked forward (1 of 2 sites)"].calls == 2  # the layerwise term: one forward per site
    assert phases["target forward"].flops == 2 * ROWS * 5 * 2 * 2  # 5 -> 2 -> 5
    # the compiled mlp CI function, forced eager: an erf and an exp per GELU unit (rows × C 20 × hidden 16, 2 sites)
    assert phases["CI function forward"].transcendentals == 2 * ROWS * 20 * 16 * 2
    assert all(p.gemm_s > 0 for p in phases.values() if p.flops)
    assert all(p.grad is None for p in dec.cm.parameters())  # the counted step leaves no gradients behind
    rates = Rates(gemm_flops=1e9, transcendentals=1e9, bandwidth=1e9)
    assert count.seconds(rates) == sum(p.seconds(rates) for p in phases.values()) > 0


def test_counts_the_adversary_source_gradients_of_a_vpd_step(tms52):
    cfg = dh.load_config("vpd_tms_5-2")
    cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps, cfg.train.batch_size = 0, 0, ROWS
    dec = dh.decompose(tms52, toy_sampler(tms52), config=cfg, steps=1, progress=False)
    count = count_step(dec.cm, dec.method, toy_sampler(tms52)(cfg.train.batch_size))
    assert count.phases["adversary source gradients"].calls == cfg.vpd.warmup_updates
    assert not dec.method.pending  # the counted step does not leave an update for the next optimizer step
