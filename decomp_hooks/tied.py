"""A linear layer whose weight is the transpose of another layer's: the tied decoder of the TMS toys."""
from __future__ import annotations

import torch
from torch import nn


class TiedLinear(nn.Module):
    """`y = x @ source.weight + bias`: reads `[d_in = source.out_features]`, writes `[d_out = source.in_features]`.

    `weight` is the canonical `[d_out, d_in]` view (`source.weight.T`), so sites treat it like an `nn.Linear`.
    """

    def __init__(self, source: nn.Linear, bias: bool = True) -> None:
        super().__init__()
        self.source = [source]  # a list keeps the source out of this module's parameters and state dict
        self.in_features = source.out_features
        self.out_features = source.in_features
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self.source[0].weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.source[0].weight
        return y + self.bias if self.bias is not None else y
