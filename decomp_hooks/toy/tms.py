"""Toy model of superposition (TMS): the 5-2 and 40-10 ground-truth targets of the SPD paper (docs/toys.md#tms)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decomp_hooks.tied import TiedLinear
from decomp_hooks.toy.fit import fit_target
from decomp_hooks.toy.sparse import SparseSampler, sample_sparse


@dataclass(frozen=True)
class TMSConfig:
    """Shape and data distribution of a TMS target; frozen so presets can be shared safely."""

    n_features: int = 5
    n_hidden: int = 2
    n_identity_layers: int = 0
    feature_prob: float = 0.05
    init_bias_to_zero: bool = False


def _frozen_identity(n: int) -> nn.Linear:
    """An `n x n` linear layer fixed to the identity: the +ID variant's hidden layer."""
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
    layer.weight.requires_grad_(False)
    return layer


class TMSModel(nn.Module):
    """`x̂ = ReLU(Wᵀ (I ...) W x + b)` with `linear1.weight = W` and a tied decoder `linear2`."""

    def __init__(self, config: TMSConfig) -> None:
        super().__init__()
        self.config = config
        self.linear1 = nn.Linear(config.n_features, config.n_hidden, bias=False)
        self.hidden_layers = nn.ModuleList(_frozen_identity(config.n_hidden) for _ in range(config.n_identity_layers))
        self.linear2 = TiedLinear(self.linear1, bias=True)
        if not config.init_bias_to_zero:  # nn.Linear's default bias init for the decoder (fan_in = n_hidden)
            bound = 1 / math.sqrt(config.n_hidden)
            nn.init.uniform_(self.linear2.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))


def sample_tms(
    batch_size: int,
    n_features: int,
    feature_prob: float,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Sparse TMS inputs `[batch_size, n_features]`: each feature on with prob `feature_prob`, value U[0, 1], else 0."""
    return sample_sparse(batch_size, n_features, feature_prob, 0.0, generator, device)


class TMSSampler(SparseSampler):
    """Data callable `sampler(batch_size) -> batch` for a TMS target (values U[0, 1])."""

    low = 0.0


def train_tms(
    config: TMSConfig,
    steps: int = 10_000,
    batch_size: int = 1024,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TMSModel:
    """Train a TMS target (AdamW, constant lr, MSE(x̂, x)); seeded privately, so the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TMSModel(config).to(device)
    sampler = TMSSampler(config, device, torch.Generator(device).manual_seed(seed))
    return fit_target(model, sampler, lambda x: x, steps, batch_size, lr, weight_decay, "train TMS", progress)


def tms_ground_truth(model: TMSModel) -> Tensor:
    """`linear1.weight` `[n_hidden, n_features]`: column `c` is feature `c`'s rank-one mechanism `W[:, c] e_cᵀ`."""
    return model.linear1.weight.detach().clone()


# The reference recipe trains 5-2 with nn.Linear's default decoder-bias init; with exact weight tying that kills
# 1-5 features on 9 of 10 seeds (output unit dead from step 0), so every preset starts the bias at zero instead.
_RECIPE_5_2 = {"steps": 10_000, "batch_size": 1024}
_RECIPE_40_10 = {"steps": 10_000, "batch_size": 8192}
_RECIPE_40_10_APD = {"steps": 2_000, "batch_size": 2048, "lr": 1e-3}  # the APD paper's target (docs/toys.md#tms)
TMS_PRESETS: dict[str, tuple[TMSConfig, dict[str, Any]]] = {
    "tms_5-2": (TMSConfig(5, 2, init_bias_to_zero=True), _RECIPE_5_2),
    "tms_5-2-id": (TMSConfig(5, 2, n_identity_layers=1, init_bias_to_zero=True), _RECIPE_5_2),
    "tms_40-10": (TMSConfig(40, 10, init_bias_to_zero=True), _RECIPE_40_10),
    "tms_40-10-apd": (TMSConfig(40, 10, init_bias_to_zero=True), _RECIPE_40_10_APD),
    "tms_40-10-id": (TMSConfig(40, 10, n_identity_layers=1, init_bias_to_zero=True), _RECIPE_40_10),
}
