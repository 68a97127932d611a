"""What the field reports for a decomposed language model (docs/lm.md#evaluation): KL to the target and next-token
CE under each mask type, CE differences and the fraction of CE left unrecovered.

Mask types, all sites masked at once: `ci_masked` (m = g), `unmasked` (m = 1), `stoch_masked` (m = g + (1 − g)u,
with a uniform delta mask), `rounded_masked` (m = 1[g > τ]), `random_masked` (m = u), `zero_masked` (m = 0) and
`adversarial` (the evaluation PGD probe's masks). The delta component is off except under `stoch_masked`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from decomp_hooks.components import SiteMask
from decomp_hooks.metrics import ce_loss, kl_logits

#: the zero-ablation CE gap (nats) below which `ce_unrecovered_*` is not reported: a ratio over noise
MIN_CE_GAP = 0.01

MaskFn = Callable[[torch.Tensor, float], SiteMask]

#: mask type -> the site mask it makes from the causal importances g and the alive threshold τ
MASK_TYPES: dict[str, MaskFn] = {
    "ci_masked": lambda g, tau: SiteMask(g),
    "unmasked": lambda g, tau: SiteMask(torch.ones_like(g)),
    "stoch_masked": lambda g, tau: SiteMask(torch.addcmul(g, 1 - g, torch.rand_like(g)),
                                            torch.rand(g.shape[:-1], device=g.device, dtype=g.dtype)),
    "rounded_masked": lambda g, tau: SiteMask((g > tau).to(g.dtype)),
    "random_masked": lambda g, tau: SiteMask(torch.rand_like(g)),
    "zero_masked": lambda g, tau: SiteMask(torch.zeros_like(g)),
}


def lm_metrics(ctx: Any, labels: torch.Tensor, tau: float, adversarial: torch.Tensor | None = None) -> dict[str, float]:
    """`ce_target`, and `kl_<mask>` / `ce_<mask>` for every mask type on one batch (`ctx`: the method's step
    context, holding the target output, CI and ΔW); `adversarial`: the output under the PGD probe's masks."""
    out = {"ce_target": ce_loss(ctx.target_out, labels).item()}
    for kind, make in MASK_TYPES.items():
        masks = {n: make(c.lower, tau) for n, c in ctx.ci.items()}
        logits, _ = ctx.cm(ctx.batch, masks=masks, delta_ws=ctx.delta_ws)
        out[f"kl_{kind}"] = kl_logits(logits, ctx.target_out).item()
        out[f"ce_{kind}"] = ce_loss(logits, labels).item()
    if adversarial is not None:
        out["kl_adversarial"] = kl_logits(adversarial, ctx.target_out).item()
        out["ce_adversarial"] = ce_loss(adversarial, labels).item()
    return out


def ce_summary(record: dict[str, Any]) -> dict[str, float | None]:
    """From `ce_target` and `ce_<mask>` in `record`: `ce_difference_<mask>` and `ce_unrecovered_<mask>` =
    (CE − CE_target) / (CE_zero − CE_target), None where the zero-ablation gap is under `MIN_CE_GAP` nats."""
    if "ce_target" not in record:
        return {}
    target = record["ce_target"]
    gap = record.get("ce_zero_masked", target) - target
    out: dict[str, float | None] = {}
    for key, value in record.items():
        if key.startswith("ce_") and key not in ("ce_target",) and not key.startswith(("ce_difference_", "ce_unrecovered_")):
            kind = key.removeprefix("ce_")
            out[f"ce_difference_{kind}"] = value - target
            out[f"ce_unrecovered_{kind}"] = (value - target) / gap if gap >= MIN_CE_GAP else None
    return out
