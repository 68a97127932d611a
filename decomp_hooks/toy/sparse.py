"""Sparse feature inputs shared by the TMS and residual-MLP toys: each feature on with a small probability."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor


def sample_sparse(
    batch_size: int,
    n_features: int,
    feature_prob: float,
    low: float = 0.0,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """`[batch_size, n_features]`: each feature on with prob `feature_prob`, value U[low, 1], else 0."""
    if device is None and generator is not None:
        device = generator.device
    shape = (batch_size, n_features)
    active = torch.rand(shape, generator=generator, device=device) < feature_prob
    values = (1 - low) * torch.rand(shape, generator=generator, device=device) + low
    return values * active


class SparseSampler:
    """Data callable `sampler(batch_size) -> batch` for a toy config with `n_features` and `feature_prob`.

    Uses the global RNG unless given a generator; subclasses set `low`, the bottom of the value range.
    """

    low: ClassVar[float] = 0.0

    def __init__(self, config: Any, device: str | torch.device | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.config = config
        self.device = device
        self.generator = generator

    def __call__(self, batch_size: int) -> Tensor:
        return sample_sparse(batch_size, self.config.n_features, self.config.feature_prob, self.low, self.generator,
                             self.device)
