"""The pieces of the language-model evaluation: the guarded CE ratio, the C table, and held-out aggregation (token
means, CE ratios of the means, alive components over every held-out position)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from decomp_hooks.lm.capacity import default_c, fill_default_c, matrix_type
from decomp_hooks.lm.metrics import ce_summary
from decomp_hooks.train.held_out import HeldOut


def test_ce_unrecovered_is_the_fraction_of_the_zero_ablation_gap():
    out = ce_summary({"ce_target": 3.0, "ce_ci_masked": 3.5, "ce_zero_masked": 8.0, "kl_ci_masked": 0.4})
    assert out["ce_difference_ci_masked"] == pytest.approx(0.5)
    assert out["ce_unrecovered_ci_masked"] == pytest.approx(0.1) and out["ce_unrecovered_zero_masked"] == 1.0


def test_ce_unrecovered_is_not_reported_when_zero_ablation_costs_nothing():
    out = ce_summary({"ce_target": 10.8249, "ce_ci_masked": 10.8251, "ce_zero_masked": 10.82490001})
    assert out["ce_unrecovered_ci_masked"] is None and out["ce_difference_ci_masked"] == pytest.approx(2e-4)


def site(name: str, d_in: int, d_out: int):
    return SimpleNamespace(name=name, d_in=d_in, d_out=d_out)


@pytest.mark.parametrize("name, d_in, d_out, kind, c", [
    ("model.layers.0.self_attn.q_proj", 768, 768, "q", 512),
    ("model.layers.3.self_attn.v_proj", 768, 256, "v", 1024),
    ("blocks.0.attn.W_O", 768, 768, "o", 1024),
    ("transformer.h.0.attn.c_attn", 768, 2304, "qkv", 2048),
    ("transformer.h.0.attn.c_proj", 768, 768, "o", 1024),
    ("transformer.h.0.mlp.c_proj", 3072, 768, "mlp_out", 3584),
    ("model.layers.0.mlp.c_fc", 768, 3072, "mlp_in", 3072),
    ("blocks.1.mlp.W_gate", 768, 3072, "mlp_in", 3072),
])
def test_the_table_gives_the_vpd_papers_counts_at_width_768(name, d_in, d_out, kind, c):
    assert matrix_type(name) == kind and default_c(site(name, d_in, d_out)) == c


def test_explicit_c_wins_and_other_matrices_get_four_per_min_width():
    sites = [site("model.layers.0.mlp.down_proj", 512, 128), site("model.layers.0.mlp.c_fc", 128, 512)]
    assert fill_default_c(sites, {sites[0].name: 7, sites[1].name: None}, scale=0.5) == {sites[0].name: 7,
                                                                                       sites[1].name: 256}
    assert default_c(site("lm_head", 128, 2048)) == 4 * 128
    assert [default_c(site(n, d_in, d_out)) for n, d_in, d_out in (("linear1", 5, 2), ("linear1", 40, 10))] == [8, 40]


class FakeMethod:
    """Per batch: a CE and an L0 to average, and importances in which component b fires only in batch b."""

    cfg = SimpleNamespace(ci_alive_threshold=0.1)

    def __init__(self):
        self.batch = 0

    def evaluate(self, cm, batch):
        ce = {"ce_target": 2.0, "ce_ci_masked": 2.0 + float(batch.float().mean()), "ce_zero_masked": 6.0}
        return {**ce, "l0/s": float(self.batch), "live/s": 1, "ce_unrecovered_ci_masked": -1.0}

    def importances(self, cm, batch):
        g = torch.zeros(*batch.shape, 4)
        g[..., self.batch] = 0.5
        self.batch += 1
        return {"s": g}


def test_held_out_means_and_alive_over_all_batches():
    rows = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)])
    record = HeldOut(rows, batch_size=2)(None, FakeMethod(), torch.device("cpu"))
    assert record["ce_ci_masked"] == pytest.approx(2.5) and record["l0/s"] == pytest.approx(0.5)
    assert record["ce_unrecovered_ci_masked"] == pytest.approx(0.5 / 4.0)  # ratio of the means, not a batch's
    assert record["live/s"] == 2 and record["live/total"] == 2 and record["eval_positions"] == 12
