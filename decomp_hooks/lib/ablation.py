"""Node and edge ablation curves of a LIB (or PCA) result: a score (accuracy, −loss) vs kept directions or edges.

Node ablation projects a node layer onto its first k directions; edge ablation keeps the top-k edges of a layer
pair (edges from the constant node are free) and lets each output node see only the inputs of its kept edges
(docs/methods/lib.md#ablations). Scores are means over the data of
`metric(final node activation [B, P, d], batch)`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from decomp_hooks.data import batch_rows
from decomp_hooks.lib.basis import with_constant
from decomp_hooks.lib.build import batches, working_model
from decomp_hooks.lib.nodes import NodeLayers
from decomp_hooks.lib.result import LIBResult
from decomp_hooks.progress import progress_bar

Metric = Callable[[Tensor, Any], float]


@dataclass
class AblationCurves:
    """`nodes[layer]` and `edges[pair]` as lists of (k, score); `required[...]` the headline k; `base` the unablated score."""

    base: float
    nodes: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    edges: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    required: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"base": self.base, "nodes": self.nodes, "edges": self.edges, "required": self.required}


def k_schedule(k_max: int, base: float = 1.05) -> list[int]:
    """Every k below 10, then k growing by `base`, up to and including `k_max`."""
    ks, k = list(range(1, min(k_max, 10) + 1)), 10.0
    while k < k_max:
        k *= base
        ks.append(min(k_max, math.ceil(k)))
    return sorted(set(ks))


class Ablator:
    """A result, the model it came from (in the result's dtype) and evaluation batches, ready to score ablations."""

    def __init__(self, result: LIBResult, model: Any, data: Any, metric: Metric, batch_size: int = 1024,
                 n_samples: int | None = None):
        cfg = result.config
        module, self.device, self.dtype = working_model(model, cfg)
        self.result, self.metric = result, metric
        self.nodes = NodeLayers(module, cfg.layers, cfg.last_position_from)
        self.data = batches(data, batch_size, n_samples, self.device, self.dtype)
        self.nodes.read(self.data[0])  # learns the node widths
        self.basis = {n: (result.C[n].to(self.device, self.dtype), result.C_pinv[n].to(self.device, self.dtype))
                      for n in result.layers}

    def _score(self, final: Callable[[Any], Tensor]) -> float:
        total, rows = 0.0, 0
        with torch.no_grad():
            for batch in self.data:
                n = batch_rows(batch)
                total += float(self.metric(final(batch), batch)) * n
                rows += n
        return total / rows

    def base(self) -> float:
        """The unablated score."""
        last = len(self.nodes) - 1
        return self._score(lambda b: self.nodes.read(b, [last])[0])

    def node_score(self, layer: int, k: int) -> float:
        """Score with node layer `layer` projected onto its first `k` directions."""
        c, cp = self.basis[self.nodes.names[layer]]
        proj = c[:, :k] @ cp[:k]
        d = proj.shape[0] - 1

        def final(batch: Any) -> Tensor:
            (f,) = self.nodes.read(batch, [layer])
            return self._to_end(layer, batch, (with_constant(f) @ proj)[..., :d])
        return self._score(final)

    def edge_score(self, layer: int, keep: Tensor) -> float:
        """Score with pair (`layer`, `layer`+1) cut to the edges in `keep` `[k_out, k_in]` (the constant node's kept)."""
        keep = keep.clone()
        keep[:, 0] = True
        c_in, cp_in = self.basis[self.nodes.names[layer]]
        c_out, cp_out = self.basis[self.nodes.names[layer + 1]]
        rows, group = torch.unique(keep, dim=0, return_inverse=True)  # output nodes with equal masks share a forward
        d_in, d_out = c_in.shape[0] - 1, c_out.shape[0] - 1

        def final(batch: Any) -> Tensor:
            (f,) = self.nodes.read(batch, [layer])
            y = with_constant(f) @ c_in
            outs = []
            for chunk in rows.to(y.dtype).split(max(1, 2**22 // max(y.numel(), 1))):
                x = ((chunk[:, None, None, :] * y).flatten(0, 1) @ cp_in)[..., :d_in]
                nxt = with_constant(self.nodes.run_from(layer, batch, x)) @ c_out
                outs.append(nxt.view(chunk.shape[0], y.shape[0], *nxt.shape[1:]))
            per_group = torch.cat(outs)  # [groups, B, P', k_out]
            y_next = per_group[group, :, :, torch.arange(len(group), device=group.device)].permute(1, 2, 0)  # node i
            return self._to_end(layer + 1, batch, (y_next @ cp_out)[..., :d_out])
        return self._score(final)

    def _to_end(self, layer: int, batch: Any, f: Tensor) -> Tensor:
        last = len(self.nodes) - 1
        return f if layer == last else self.nodes.run_from(layer, batch, f, until=last)


def top_edges(edges: Tensor, k: int) -> Tensor:
    """Mask of the `k` largest non-constant edges (input node 0, the constant, excluded from the ranking)."""
    flat = edges[:, 1:].flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.argsort(descending=True)[:k]] = True
    return torch.cat([torch.ones_like(edges[:, :1], dtype=torch.bool), keep.view(edges.shape[0], -1)], 1)


def edges_for_mass(edges: Tensor, fraction: float = 0.9) -> int:
    """How many of the largest non-constant edges hold `fraction` of their total |E|."""
    vals = edges[:, 1:].abs().flatten().sort(descending=True).values
    cum = vals.cumsum(0)
    return int((cum < fraction * cum[-1]).sum().item()) + 1


def ablation_curves(result: LIBResult, model: Any, data: Any, metric: Metric, *, nodes: bool = True,
                    edges: bool = True, tolerance: float = 0.001, node_fraction: float = 0.99,
                    batch_size: int = 1024, n_samples: int | None = None, progress: bool = True) -> AblationCurves:
    """Node curves (score vs k on the exponential schedule; `required` = least k with score ≥ base − (1 −
    `node_fraction`)·|base|, i.e. `node_fraction`·base for accuracies) and
    edge bisection per layer pair (`required` = least top-k edges with score ≥ base − `tolerance`)."""
    ab = Ablator(result, model, data, metric, batch_size, n_samples)
    out = AblationCurves(base=ab.base())
    last = len(result.layers) - 1
    node_layers = range(last + 1 if result.config.rotate_final else last) if nodes else []
    for layer in progress_bar(node_layers, desc="node ablation", disable=not progress):
        name = result.layers[layer]
        curve = [(k, ab.node_score(layer, k)) for k in k_schedule(result.C[name].shape[1])]
        out.nodes[name] = curve
        floor = out.base - (1 - node_fraction) * abs(out.base)  # node_fraction·base for accuracies; also for −loss
        out.required[name] = next((k for k, s in curve if s >= floor), curve[-1][0])
    for layer in progress_bar(range(last) if edges else [], desc="edge ablation", disable=not progress):
        pair = f"{result.layers[layer]} -> {result.layers[layer + 1]}"
        e = result.edges[layer].to(ab.device)
        curve = {}

        def ok(k: int) -> bool:
            curve[k] = ab.edge_score(layer, top_edges(e, k))
            return curve[k] >= out.base - tolerance
        lo, hi = 0, e[:, 1:].numel()
        while lo < hi:  # least k with ok(k); the full graph (hi) is the unablated model
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        out.edges[pair] = sorted(curve.items())
        out.required[pair] = lo
    return out
