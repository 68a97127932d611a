"""Gradient accumulation: a global batch computed in micro-batches trains exactly like the whole batch at once
(deterministic terms), and VPD's persistent sources still cover every row of the batch."""
from __future__ import annotations

import pytest
import torch

import decomp_hooks as dh
from decomp_hooks.config import ConfigError
from decomp_hooks.toy import toy_sampler

DETERMINISTIC = {
    "targets": {"linear1": 6, "linear2": 6},
    "ci": {"type": "mlp", "hidden": [8]},
    "losses": [{"type": "faithfulness", "coeff": 1.0}, {"type": "ci_masked_recon", "coeff": 1.0},
               {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.0}],
    "train": {"steps": 4, "batch_size": 32, "lr": 1e-3, "faithfulness_warmup_steps": 0, "eval_pgd_steps": 0,
              "log_every": 2, "eval_every": 4},
}


def trained(model, micro: int | None, config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    data = torch.rand(32, model.config.n_features) * (torch.rand(32, model.config.n_features) < 0.2)
    cfg = {**config, "train": {**config["train"], "micro_batch_size": micro}}
    dec = dh.decompose(model, data, config=cfg, progress=False)
    return {k: v.detach().clone() for k, v in dec.cm.named_parameters() if v.requires_grad}, dec


def test_micro_batches_give_the_whole_batch_update(tms52):
    whole, _ = trained(tms52, None, DETERMINISTIC)
    parts, dec = trained(tms52, 8, DETERMINISTIC)
    assert whole.keys() == parts.keys()
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=1e-4, atol=1e-6)
    assert any(k.startswith("train/l0/") for r in dec.metrics for k in r)


def test_vpd_sources_cover_every_micro_batch(tms52):
    cfg = {"method": "vpd", "targets": {"linear1": 6, "linear2": 6}, "ci": {"type": "mlp", "hidden": [8]},
           "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "persistent_pgd_recon", "coeff": 1.0},
                      {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.0, "beta": 0.5}],
           "vpd": {"lr": 0.05},
           "train": {"steps": 3, "batch_size": 64, "micro_batch_size": 16, "faithfulness_warmup_steps": 0,
                     "eval_pgd_steps": 0, "eval_every": 3, "log_every": 1}}
    dec = dh.decompose(tms52, toy_sampler(tms52), config=cfg, progress=False)
    r = dec.method.adversary.r["linear1"]
    assert r.shape == (64, 7)
    assert dec.method.adversary.t == 3 * 3  # per step: 2 warm-up rounds and one after the optimizer step
    assert dec.method.micro == 0 and not dec.method.pending


def test_micro_batch_size_must_divide_the_batch():
    with pytest.raises(ConfigError, match="micro_batch_size=24"):
        dh.load_config({"train": {"batch_size": 64, "micro_batch_size": 24}})
