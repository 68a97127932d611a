"""Evaluation on held-out data rather than on a training batch (language models: the rows a data config holds out).

Every rank evaluates its equal share of the rows, batch by batch, with the method's own `evaluate`; means are
token-weighted and averaged over ranks, CE differences are recomputed from the mean CEs, and a component counts as
live when its importance exceeds the alive threshold at any held-out position (not merely in one batch).
"""
from __future__ import annotations

from typing import Any

import torch

from decomp_hooks import distributed
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.data import DataError, row_share
from decomp_hooks.lm.metrics import ce_summary
from decomp_hooks.methods.base import Method

#: per-batch keys that are not averaged: recomputed from the averages or over all positions
DERIVED = ("live/", "ce_difference_", "ce_unrecovered_")


class HeldOut:
    """Held-out rows (a tensor, rows on dim 0) evaluated `batch_size` rows at a time, split evenly over the ranks."""

    def __init__(self, rows: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        usable = rows.shape[0] - rows.shape[0] % world_size
        if usable == 0:
            raise DataError(f"{rows.shape[0]} held-out rows cannot be shared by {world_size} processes; hold out at "
                            f"least {world_size} rows.")
        self.rows, self.batch_size = row_share(rows[:usable], rank, world_size), batch_size

    @torch.no_grad()
    def __call__(self, cm: ComponentModel, method: Method, device: torch.device) -> dict[str, Any]:
        sums: dict[str, float] = {}
        peak: dict[str, torch.Tensor] = {}
        for batch in self.rows.split(self.batch_size):
            batch = batch.to(device)
            for key, value in method.evaluate(cm, batch).items():
                if isinstance(value, (int, float)) and not key.startswith(DERIVED):
                    sums[key] = sums.get(key, 0.0) + value * batch.shape[0]
            for name, g in method.importances(cm, batch).items():
                top = g.flatten(0, -2).float().amax(0)
                peak[name] = top if name not in peak else torch.maximum(peak[name], top)
        record = distributed.mean_over_ranks({k: v / self.rows.shape[0] for k, v in sums.items()})
        record.update(ce_summary(record))
        tau = method.cfg.ci_alive_threshold
        live = {f"live/{n}": int((distributed.max_(p) > tau).sum()) for n, p in peak.items()}
        l0 = [v for k, v in record.items() if k.startswith("l0/")]
        positions = self.rows.numel() if not self.rows.is_floating_point() else self.rows.shape[0]
        return {**record, **live, "l0/total": sum(l0), "live/total": sum(live.values()),
                "eval_positions": positions * distributed.current().world_size}
