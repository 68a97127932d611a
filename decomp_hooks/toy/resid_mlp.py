"""Residual MLP toys (compressed computation, 1/2/3 layers): ground-truth targets of the SPD paper
(docs/toys.md#residual-mlp)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decomp_hooks.toy.fit import fit_target
from decomp_hooks.toy.sparse import SparseSampler, sample_sparse


@dataclass(frozen=True)
class ResidMLPConfig:
    """Shape and data distribution of a residual MLP target; frozen so presets can be shared safely."""

    n_features: int = 100
    d_embed: int = 1000
    d_mlp: int = 50
    n_layers: int = 1
    feature_prob: float = 0.01


class ResidMLPBlock(nn.Module):
    """One bias-free ReLU MLP writing into the residual stream; its sites are `mlp_in` and `mlp_out`."""

    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, r: Tensor) -> Tensor:
        return self.mlp_out(F.relu(self.mlp_in(r)))


class ResidMLP(nn.Module):
    """`ŷ = r_L W_Eᵀ` with `r_0 = x W_E` and `r ← r + MLP(r)`; `W_E` is a fixed random buffer with unit-norm rows."""

    def __init__(self, config: ResidMLPConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        embed = torch.randn(config.n_features, config.d_embed, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("W_E", embed / embed.norm(dim=1, keepdim=True))
        self.layers = nn.ModuleList(ResidMLPBlock(config.d_embed, config.d_mlp) for _ in range(config.n_layers))

    def forward(self, x: Tensor) -> Tensor:
        r = x @ self.W_E
        for layer in self.layers:
            r = r + layer(r)
        return r @ self.W_E.T


def sample_resid_mlp(
    batch_size: int,
    n_features: int,
    feature_prob: float,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Sparse inputs `[batch_size, n_features]`: each feature on with prob `feature_prob`, value U[-1, 1], else 0."""
    return sample_sparse(batch_size, n_features, feature_prob, -1.0, generator, device)


def resid_mlp_labels(x: Tensor) -> Tensor:
    """Target-training labels `y = x + ReLU(x)` (the reference's `act_plus_resid` with unit coefficients)."""
    return x + F.relu(x)


class ResidMLPSampler(SparseSampler):
    """Data callable `sampler(batch_size) -> batch` for a residual MLP target (values U[-1, 1])."""

    low = -1.0


def _cosine_lr(lr: float, step: int, steps: int) -> float:
    """Half-period cosine decay from `lr` at step 0 to 0 at the last step."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))


def train_resid_mlp(
    config: ResidMLPConfig,
    steps: int = 1000,
    batch_size: int = 2048,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ResidMLP:
    """Train a residual MLP target (AdamW, cosine lr to 0, MSE to `x + ReLU(x)`); leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResidMLP(config, seed=seed).to(device)
    sampler = ResidMLPSampler(config, device, torch.Generator(device).manual_seed(seed))
    return fit_target(model, sampler, resid_mlp_labels, steps, batch_size, lr, weight_decay, "train ResidMLP", progress,
                      lr_at=lambda step: _cosine_lr(lr, step, steps))


RESID_MLP_PRESETS: dict[str, tuple[ResidMLPConfig, dict[str, Any]]] = {
    "resid_mlp1": (ResidMLPConfig(n_features=100, d_mlp=50, n_layers=1), {"steps": 1000, "batch_size": 2048}),
    "resid_mlp2": (ResidMLPConfig(n_features=100, d_mlp=25, n_layers=2), {"steps": 1000, "batch_size": 2048}),
    "resid_mlp3": (ResidMLPConfig(n_features=102, d_mlp=17, n_layers=3), {"steps": 10_000, "batch_size": 2048}),
}
