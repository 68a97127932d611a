"""The learning-rate schedule."""
from __future__ import annotations

import math

from decomp_hooks.config import ScheduleConfig


def lr_at(step: int, total: int, base: float, sched: ScheduleConfig) -> float:
    """Linear warmup from 0 over warmup_pct·T steps, then constant / linear / half-cosine to final_val_frac·base."""
    warmup = int(sched.warmup_pct * total)
    if step < warmup:
        return base * (step + 1) / warmup
    if sched.fn == "constant" or total <= warmup:
        return base
    t = (step - warmup) / max(total - warmup, 1)
    final = sched.final_val_frac * base
    if sched.fn == "linear":
        return base + (final - base) * t
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))
