"""Causal-importance functions and the hard sigmoids that turn their raw output into importances in [0, 1].

`g = σ_lower(z)` makes the masks, `g⁺ = σ_upper(z)` enters the importance-minimality loss (docs/concepts.md#hard-sigmoids).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decomp_hooks.sites import SiteKind


class _LowerLeakyHard(torch.autograd.Function):
    """Forward clamp(z, 0, 1); backward passes γ on (0, 1], 0 above 1, and 0.01·γ below 0 only when γ < 0."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        inside = (z > 0) & (z <= 1)
        below = (z <= 0) & (grad < 0)
        return torch.where(inside, grad, torch.where(below, 0.01 * grad, torch.zeros_like(grad)))


def lower_leaky_hard_sigmoid(z: torch.Tensor) -> torch.Tensor:
    return _LowerLeakyHard.apply(z)


def upper_leaky_hard_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """0 below 0, z on [0, 1], 1 + 0.01 (z − 1) above 1, with ordinary gradients."""
    return torch.where(z > 1, 1 + 0.01 * (z - 1), z.clamp(min=0.0))


def _leaky_hard_pair_forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return z.clamp(0.0, 1.0), torch.where(z > 1, 1 + 0.01 * (z - 1), z.clamp(min=0.0))


def _leaky_hard_pair_backward(z: torch.Tensor, d_lower: torch.Tensor, d_upper: torch.Tensor) -> torch.Tensor:
    """∂z from both outputs: σ_lower's one-sided leaky gradient, plus σ_upper's slope (0 below 0, 1 on [0, 1],
    0.01 above 1; at exactly 0 it passes, as clamp's gradient does)."""
    lower = torch.where((z > 0) & (z <= 1), d_lower, torch.where((z <= 0) & (d_lower < 0), 0.01 * d_lower, 0.0))
    return lower + d_upper * torch.where(z > 1, 0.01, torch.where(z >= 0, 1.0, 0.0))


class _LeakyHardPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, kernels):
        ctx.save_for_backward(z)
        ctx.backward_kernel = kernels[1]
        return kernels[0](z)

    @staticmethod
    def backward(ctx, d_lower, d_upper):
        (z,) = ctx.saved_tensors
        return ctx.backward_kernel(z, *_dense_grads(z, d_lower, d_upper)), None


def _dense_grads(like: torch.Tensor, *grads: torch.Tensor | None) -> list[torch.Tensor]:
    """Upstream gradients as contiguous tensors for a compiled kernel, zeros for outputs that received none."""
    return [torch.zeros_like(like) if g is None else g.contiguous() for g in grads]


class LeakyHardPair:
    """`(σ_lower(z), σ_upper(z))` of one z as one fused kernel forward and one backward (torch.compile): the same
    values and gradients as the two `leaky_hard` sigmoids, without a dozen elementwise passes each way."""

    def __init__(self, **compile_kwargs):
        self.kernels = (torch.compile(_leaky_hard_pair_forward, **compile_kwargs),
                        torch.compile(_leaky_hard_pair_backward, **compile_kwargs))

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _LeakyHardPair.apply(z, self.kernels)


SIGMOIDS = {
    "leaky_hard": (lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid),
    "hard": (lambda z: z.clamp(0.0, 1.0),) * 2,
    "normal": (torch.sigmoid,) * 2,
    "upper_leaky_hard": (upper_leaky_hard_sigmoid,) * 2,
}


def _kaiming(shape: tuple[int, ...], fan_in: int, gain: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * (gain / math.sqrt(fan_in)))


def _mlp1_forward(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """z_c = w2_c · GELU(w1_c h_c + b1_c) + b2_c for every component at once (one hidden layer)."""
    return (F.gelu(h.unsqueeze(-1) * w1 + b1) * w2).sum(-1) + b2


def _gelu_parts(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Φ(pre) and GELU'(pre) = Φ + pre·φ, with one erf and one exp per element (GELU = pre·Φ). φ's exp is written
    as exp2: inductor stores any reused CPU term containing `exp` (here 52 MB per TMS 40-10 site, its page faults
    and traffic tripling the backward), and recomputes one containing `exp2` inside the loop that reads it."""
    cdf = 0.5 * (1 + torch.erf(pre * _SQRT_HALF))
    return cdf, cdf + pre * torch.exp2(pre * pre * _HALF_LOG2E) * _INV_SQRT_2PI


def _mlp1_forward_with_slope(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """z and its slope ∂z/∂h = Σ w1 w2 GELU'(pre) in one pass: the backward's ∂h is then ∂z·slope, with no second
    pass over the [positions, C, hidden] elements for it."""
    pre = h.unsqueeze(-1) * w1 + b1
    cdf, slope = _gelu_parts(pre)
    return (pre * cdf * w2).sum(-1) + b2, (slope * (w1 * w2)).sum(-1)


def _mlp1_param_grads(dz_t: torch.Tensor, h_t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """∂w1, ∂b1, ∂w2 from ∂z and h laid out [C, positions]: sums over the contiguous last dim, which the compiler
    turns into one vectorised loop per (component, hidden unit) without writing the [C, hidden, positions] terms."""
    pre = h_t.unsqueeze(1) * w1.unsqueeze(-1) + b1.unsqueeze(-1)  # [C, hidden, positions], never stored
    cdf, slope = _gelu_parts(pre)
    dpre = dz_t.unsqueeze(1) * w2.unsqueeze(-1) * slope
    return (dpre * h_t.unsqueeze(1)).sum(-1), dpre.sum(-1), (dz_t.unsqueeze(1) * pre * cdf).sum(-1)


_SQRT_HALF, _INV_SQRT_2PI, _HALF_LOG2E = math.sqrt(0.5), 1 / math.sqrt(2 * math.pi), -0.5 * math.log2(math.e)


def _mlp1_importances(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
    """σ_lower(z), σ_upper(z), z and ∂z/∂h of the one-hidden-layer MLP, in one pass."""
    z, slope = _mlp1_forward_with_slope(h, w1, b1, w2, b2)
    return (*_leaky_hard_pair_forward(z), z, slope)


class _MLP1Kernels:
    """The compiled pieces of the one-hidden-layer MLP: its forward (without and with the slope), the parameter
    gradients, and the forward and backward through both leaky-hard sigmoids."""

    def __init__(self, compiled: bool = True, **kwargs):
        def wrap(fn, **options):
            if not compiled:
                return fn
            return torch.compile(fn, **{**kwargs, "options": {**kwargs.get("options", {}), **options}})
        self.forward = wrap(_mlp1_forward)
        self.forward_with_slope = wrap(_mlp1_forward_with_slope)
        # keep the [C, hidden, positions] terms, which read five tensors, inside the loop of the three sums (inductor
        # stores a term read more than 4 times): 8 ms instead of 22 for TMS 40-10's sites on 2 cores
        self.param_grads = wrap(_mlp1_param_grads, realize_reads_threshold=64)
        self.importances = wrap(_mlp1_importances)
        self.pair_backward = wrap(_leaky_hard_pair_backward)

    def grads(self, dz: torch.Tensor, slope: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gradients for (h, w1, b1, w2, b2) from ∂z: ∂h elementwise from the saved slope, the rest summed over
        positions in one compiled pass."""
        C = h.shape[-1]
        dz_t, h_t = dz.reshape(-1, C).t().contiguous(), h.reshape(-1, C).t().contiguous()
        dw1, db1, dw2 = self.param_grads(dz_t, h_t.to(w1.dtype), w1, b1, w2)
        return (dz * slope).to(h.dtype), dw1, db1, dw2, dz_t.sum(1)


class _MLP1(torch.autograd.Function):
    """The one-hidden-layer per-component MLP with a hand-written backward, each part one compiled loop."""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2, kernels):
        z, slope = kernels.forward_with_slope(h, w1, b1, w2, b2)
        ctx.save_for_backward(h, w1, b1, w2, slope)
        ctx.kernels = kernels
        return z

    @staticmethod
    def backward(ctx, dz):
        h, w1, b1, w2, slope = ctx.saved_tensors
        return (*ctx.kernels.grads(dz.contiguous(), slope, h, w1, b1, w2), None)


class _MLP1Importances(torch.autograd.Function):
    """The one-hidden-layer MLP and both leaky-hard sigmoids as one compiled kernel forward; backward, ∂z through
    both sigmoids, then the MLP's gradients."""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2, kernels):
        lower, upper, z, slope = kernels.importances(h, w1, b1, w2, b2)
        ctx.save_for_backward(h, w1, b1, w2, z, slope)
        ctx.kernels = kernels
        return lower, upper

    @staticmethod
    def backward(ctx, d_lower, d_upper):
        h, w1, b1, w2, z, slope = ctx.saved_tensors
        dz = ctx.kernels.pair_backward(z, *_dense_grads(z, d_lower, d_upper))
        return (*ctx.kernels.grads(dz, slope, h, w1, b1, w2), None)


class PerComponentMLP(nn.Module):
    """`mlp`: each component's own small GELU MLP on its scalar inner activation h_c = (a V)_c (the paper's)."""

    takes_inner_acts = True

    def __init__(self, d_in: int, C: int, hidden: list[int]):
        super().__init__()
        dims = [1, *hidden]
        self.weights = nn.ParameterList(_kaiming((C, a, b), a, math.sqrt(2)) for a, b in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(C, b)) for b in dims[1:])
        self.w_out = _kaiming((C, dims[-1]), dims[-1], 1.0)
        self.b_out = nn.Parameter(torch.zeros(C))
        self.kernels: _MLP1Kernels | None = None

    def compile(self, **kwargs) -> None:
        """With one hidden layer (the paper's), fuse the elementwise forward and backward with torch.compile; deeper
        MLPs compile as a whole."""
        if len(self.weights) != 1:
            return super().compile(**kwargs)
        self.kernels = _MLP1Kernels(**kwargs)

    def _params(self) -> tuple[torch.Tensor, ...]:
        return self.weights[0].squeeze(1), self.biases[0], self.w_out, self.b_out

    def leaky_hard_importances(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(σ_lower(z), σ_upper(z))` of this MLP's z in one fused kernel each way, once compiled; else None."""
        if self.kernels is None:
            return None
        if not torch.is_grad_enabled():
            return tuple(self.kernels.importances(h, *self._params())[:2])
        return _MLP1Importances.apply(h, *self._params(), self.kernels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            if not torch.is_grad_enabled():
                return self.kernels.forward(h, *self._params())
            return _MLP1.apply(h, *self._params(), self.kernels)
        x = h.unsqueeze(-1)  # [..., C, 1]
        for w, b in zip(self.weights, self.biases):
            x = F.gelu(torch.einsum("...ca,cab->...cb", x, w) + b)
        return (x * self.w_out).sum(-1) + self.b_out


class VectorMLP(nn.Module):
    """`vector_mlp`: each component's own GELU MLP on the full site input a."""

    takes_inner_acts = False

    def __init__(self, d_in: int, C: int, hidden: list[int]):
        super().__init__()
        self.C, self.h0 = C, hidden[0]
        self.w_in = _kaiming((C * hidden[0], d_in), d_in, math.sqrt(2))
        self.b_in = nn.Parameter(torch.zeros(C * hidden[0]))
        dims = hidden
        self.weights = nn.ParameterList(_kaiming((C, a, b), a, math.sqrt(2)) for a, b in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(C, b)) for b in dims[1:])
        self.w_out = _kaiming((C, dims[-1]), dims[-1], 1.0)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        x = F.gelu(F.linear(a, self.w_in, self.b_in)).unflatten(-1, (self.C, self.h0))
        for w, b in zip(self.weights, self.biases):
            x = F.gelu(torch.einsum("...ca,cab->...cb", x, w) + b)
        return (x * self.w_out).sum(-1) + self.b_out


class SharedMLP(nn.Module):
    """`shared_mlp`: one GELU MLP per site from the site input a to all C raw importances."""

    takes_inner_acts = False

    def __init__(self, d_in: int, C: int, hidden: list[int]):
        super().__init__()
        dims = [d_in, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], C)
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=math.sqrt(2 / layer.in_features))
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.out.weight, std=1 / math.sqrt(dims[-1]))
        nn.init.zeros_(self.out.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            a = F.gelu(layer(a))
        return self.out(a)


CI_FUNCTIONS = {"mlp": PerComponentMLP, "vector_mlp": VectorMLP, "shared_mlp": SharedMLP}


def make_ci_fn(kind: str, site_kind: SiteKind, d_in: int, C: int, hidden: list[int]) -> nn.Module:
    """Build one site's CI function; embeddings allow only `mlp` (their input is a token id, not a vector)."""
    if SiteKind(site_kind).reads_tokens and kind != "mlp":
        raise ValueError(f"ci.type={kind!r} cannot read an embedding site's token ids; use ci.type='mlp' for embeddings.")
    return CI_FUNCTIONS[kind](d_in, C, hidden)
