"""VPD's own config section, `vpd:`: the persistent adversary's ascent."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VPDConfig:
    """The persistent PGD adversary: sources r ∈ [0, 1] per position and site (delta included), updated by Adam
    ascent on the reconstruction loss, `warmup_updates` times before each step's loss and once after the optimizer
    step; the learning rate rises linearly from 0 over `lr_warmup_frac` of the steps, then stays at `lr`."""

    lr: float = 0.01
    lr_warmup_frac: float = 0.025
    betas: list[float] = field(default_factory=lambda: [0.5, 0.99])
    eps: float = 1e-8
    warmup_updates: int = 2
