"""Global causal-importance functions: one network sees every decomposed site's input at once and gives the raw
importances z of every component of every site (VPD's CI functions; docs/concepts.md#causal-importance).

The sites' inputs are each RMS-normalised (no learned scale) and concatenated in sorted site-name order, so the
network's input width is Σ_l d_in_l. `global_shared_mlp` maps that vector at each position through a GELU MLP;
`global_shared_transformer` first projects it to width `d_model`, then runs pre-norm blocks of bidirectional
multi-head attention over the positions (RoPE) and a GELU feed-forward layer, and projects to Σ_l C_l.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decomp_hooks.causal_importance import SharedMLP


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / RMS(x) over the last dimension, without a learned scale."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class GlobalCI(nn.Module):
    """The shared part: which sites, in what order, and how the flat output splits into per-site z."""

    takes_inner_acts = False

    def __init__(self, d_ins: dict[str, int], Cs: dict[str, int]):
        super().__init__()
        self.names = sorted(d_ins)
        self.d_ins, self.Cs = d_ins, Cs
        self.d_in, self.C = sum(d_ins.values()), sum(Cs[n] for n in self.names)

    def joint_input(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every site's RMS-normed input, concatenated in sorted order: `[..., Σ d_in]`."""
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise ValueError(f"a global CI function reads every site's input at once; missing {missing}.")
        return torch.cat([rms_norm(inputs[n]) for n in self.names], -1)

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, z.split([self.Cs[n] for n in self.names], -1)))


class GlobalSharedMLP(GlobalCI):
    """`global_shared_mlp`: one GELU MLP from the joint input at each position to every component's z."""

    def __init__(self, d_ins: dict[str, int], Cs: dict[str, int], hidden: list[int]):
        super().__init__(d_ins, Cs)
        self.mlp = SharedMLP(self.d_in, self.C, hidden)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.split(self.mlp(self.joint_input(inputs)))


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of `x [batch, heads, positions, d_head]` (d_head even): pairs of coordinates
    (i, i + d_head/2) rotated by position · base^(−2i/d_head)."""
    T, d = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(RMSNorm x); x += FFN(RMSNorm x), attention bidirectional with RoPE."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, rope_base: float):
        super().__init__()
        self.n_heads, self.rope_base = n_heads, rope_base
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ffn_in, self.ffn_out = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rope(q, self.rope_base), rope(k, self.rope_base), v, is_causal=False)
        x = x + self.out(a.transpose(1, 2).flatten(-2))
        return x + self.ffn_out(F.gelu(self.ffn_in(self.norm2(x))))


class GlobalSharedTransformer(GlobalCI):
    """`global_shared_transformer`: joint input → Linear(Σ d_in → d_model) → blocks over the positions →
    Linear(d_model → Σ C). Inputs without a position dimension (toys) are one-position sequences."""

    def __init__(self, d_ins: dict[str, int], Cs: dict[str, int], d_model: int, n_blocks: int, n_heads: int,
                 d_ffn: int, rope_base: float):
        super().__init__(d_ins, Cs)
        self.inp = nn.Linear(self.d_in, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ffn, rope_base) for _ in range(n_blocks))
        self.head = nn.Linear(d_model, self.C)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(d_model))
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.joint_input(inputs)
        flat = x.dim() == 2
        h = self.inp(x.unsqueeze(1) if flat else x.flatten(0, -3))
        for block in self.blocks:
            h = block(h)
        z = self.head(h)
        return self.split(z.squeeze(1) if flat else z.unflatten(0, x.shape[:-2]))


#: `ci.type` -> builder(ci config, input width per site, C per site)
GLOBAL_CI_FUNCTIONS = {
    "global_shared_mlp": lambda ci, d_ins, Cs: GlobalSharedMLP(d_ins, Cs, ci.hidden),
    "global_shared_transformer": lambda ci, d_ins, Cs: GlobalSharedTransformer(
        d_ins, Cs, ci.d_model, ci.n_blocks, ci.n_heads, ci.d_ffn or 4 * ci.d_model, ci.rope_base),
}
