"""A loss term: a function of the SPD method, the step context, its own config and the training progress."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from decomp_hooks.methods.spd.config import LossConfig
    from decomp_hooks.methods.spd.context import StepContext
    from decomp_hooks.methods.spd.method import SPD

TermFn = Callable[["SPD", "StepContext", "LossConfig", float], torch.Tensor]


@dataclass(frozen=True)
class Term:
    """`fn(spd, ctx, lc, frac)`; `needs_delta`: the step must compute ΔW per site (with gradients) for it."""

    fn: TermFn
    needs_delta: bool = False
