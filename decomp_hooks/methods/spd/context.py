"""What every SPD loss term of one step reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decomp_hooks.component_model import CausalImportance, ComponentModel


@dataclass
class StepContext:
    """The batch, target output and site inputs, CI, ΔW per site (where a term needs it), and the sites' `x V` that
    masked forwards may reuse."""

    cm: ComponentModel
    batch: object
    target_out: torch.Tensor
    inputs: dict[str, torch.Tensor]
    ci: dict[str, CausalImportance]
    delta_ws: dict[str, torch.Tensor]
    reuse: dict[str, torch.Tensor]
