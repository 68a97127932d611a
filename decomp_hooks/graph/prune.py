"""Pruning a graph to the nodes and edges that carry most of the influence on the target outputs (circuit-tracer's
`prune_graph`, docs/graphs.md#pruning), and how much of that influence the pruned graph keeps.

With `Â` the adjacency `A[target, source]` in absolute value, each row normalised to sum 1 (a node's inputs as
shares of its total absolute input), and `w` the target weights on the output rows, a node's influence is
`w (Â + Â² + …) = w Â (I − Â)⁻¹`: the share of the outputs' attribution that flows through it, over all paths. The
graph is a DAG, so the series ends after at most its depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Pruned:
    """Which nodes and edges a pruning keeps, each node's influence on the targets (`influence`) and cumulative
    influence (circuit-tracer's `influence`: the share of all node influence held by it and the nodes above it),
    and what the kept graph carries:
    `influence_kept` (of the outputs' influence flowing back to the graph's sources, the share travelling over kept
    edges only) and `node_influence_kept` (the kept nodes' share of all node influence)."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    cumulative: torch.Tensor
    influence_kept: float
    node_influence_kept: float
    node_threshold: float
    edge_threshold: float


def normalized(A: torch.Tensor) -> torch.Tensor:
    """`|A|` with each row divided by its sum (rows without inputs stay zero)."""
    absolute = A.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10)


def influence(Â: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`w Â + w Â² + …`, summed until the flow is spent (at most one term per node: Â is nilpotent on a DAG)."""
    flow = weights @ Â
    total = flow.clone()
    for _ in range(Â.shape[0]):
        if not flow.any():
            return total
        flow = flow @ Â
        total += flow
    raise ValueError("the attribution graph has a cycle; influence does not converge.")


def cutoff(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the fewest top scores whose sum reaches `fraction` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def kept_flow(Â: torch.Tensor, edge_mask: torch.Tensor, weights: torch.Tensor) -> float:
    """Of the outputs' influence reaching the sources (nodes without inputs: inputs, error nodes), the share that
    travels over kept edges only, with every edge weighted as in the full graph."""
    sources = Â.sum(1) == 0
    full = influence(Â, weights)[sources].sum()
    kept = influence(Â * edge_mask, weights)[sources].sum()
    return float(kept / full.clamp(min=1e-30))


def prune(A: torch.Tensor, weights: torch.Tensor, n_features: int, n_fixed: int, node_threshold: float,
          edge_threshold: float) -> Pruned:
    """Keep the fewest nodes holding `node_threshold` of the node influence (the last `n_fixed`, inputs and outputs,
    always), then the fewest edges among them holding `edge_threshold` of the edge influence, then drop nodes left
    without outgoing edges (and, for the first `n_features`, without incoming ones) until nothing changes."""
    Â = normalized(A)
    node_influence = influence(Â, weights)
    node_mask = node_influence >= cutoff(node_influence, node_threshold)
    node_mask[-n_fixed:] = True
    kept = A * node_mask[:, None] * node_mask[None, :]
    Âk = normalized(kept)
    edge_scores = Âk * (influence(Âk, weights) + weights)[:, None]
    edge_mask = (edge_scores >= cutoff(edge_scores.flatten(), edge_threshold)) & (kept != 0)
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
        if torch.equal(before, node_mask):
            break
    ordered, order = node_influence.sort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    share = float(node_influence[node_mask].sum() / node_influence.sum().clamp(min=1e-30))
    return Pruned(node_mask, edge_mask, node_influence, cumulative, kept_flow(Â, edge_mask, weights), share,
                  node_threshold, edge_threshold)


#: how often `prune_keeping` halves the gap between the thresholds and 1 before it keeps every edge
RAISES = 20


def prune_keeping(A: torch.Tensor, weights: torch.Tensor, n_features: int, n_fixed: int, node_threshold: float,
                  edge_threshold: float, min_influence_kept: float) -> Pruned:
    """`prune` at the given thresholds, raised toward 1 (halving their distance to 1 each time) until the pruned graph
    keeps at least `min_influence_kept` of the influence (at 1, every edge is kept and so is all of it)."""
    for step in range(RAISES):
        scale = 0.5**step
        pruned = prune(A, weights, n_features, n_fixed, 1 - (1 - node_threshold) * scale,
                       1 - (1 - edge_threshold) * scale)
        if pruned.influence_kept >= min_influence_kept:
            return pruned
    return prune(A, weights, n_features, n_fixed, 1.0, 1.0)
