"""The interaction graph as JSON and PNG, and ablation curves as PNG.

Nodes are drawn per layer sorted by Λ (the basis order), edge width ∝ strength; only the top-k edges per layer pair
are drawn. Figures use `matplotlib.figure.Figure` (no pyplot state) and are written atomically.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from decomp_hooks.lib.ablation import AblationCurves, edges_for_mass
from decomp_hooks.lib.result import LIBResult
from decomp_hooks.plots import _save


def graph_dict(result: LIBResult, top_k: int | None = None) -> dict:
    """Nodes (layer, index, Λ) and edges (pair, from, to, E), the `top_k` strongest per pair (all if None), plus the
    edge counts holding 90 % and 99 % of the non-constant edge mass."""
    nodes = [{"layer": name, "index": i, "eigenvalue": float(lam)}
             for name in result.layers for i, lam in enumerate(result.eigenvalues[name].tolist())]
    edges, mass = [], {}
    for p, e in enumerate(result.edges):
        lower, upper = result.layers[p], result.layers[p + 1]
        pair = f"{lower} -> {upper}"
        mass[pair] = {"edges_90": edges_for_mass(e, 0.9), "edges_99": edges_for_mass(e, 0.99), "total": float(e.sum())}
        flat = e.flatten()
        order = flat.argsort(descending=True)[: top_k or flat.numel()]
        for idx in order.tolist():
            j_out, i_in = divmod(idx, e.shape[1])
            edges.append({"pair": pair, "from": i_in, "to": j_out, "strength": float(flat[idx])})
    return {"layers": result.layers, "basis": result.config.basis, "nodes": nodes, "edges": edges, "mass": mass}


def plot_graph(result: LIBResult, path: str | Path, top_k: int = 50, max_nodes: int = 40) -> Path:
    """PNG of the graph: one column per node layer, its first `max_nodes` directions top-down in Λ order (marker size
    ∝ log Λ), and the `top_k` strongest edges of each pair with line width ∝ strength."""
    fig = Figure(figsize=(2.2 * len(result.layers) + 2, 8))
    ax = fig.add_subplot()
    for x, name in enumerate(result.layers):
        lam = result.eigenvalues[name][:max_nodes].double()
        log = lam.clamp_min(1e-30).log10()
        size = 8 + 150 * (log - log.min()) / (log.max() - log.min() + 1e-12)
        ax.scatter([x] * len(lam), (-torch.arange(len(lam))).tolist(), s=size.tolist(), zorder=3, color="k")
    for p, e in enumerate(result.edges):
        e = e[:max_nodes, :max_nodes]
        flat = e.flatten()
        order = flat.argsort(descending=True)[:top_k]
        top = float(flat[order[0]]) if len(order) else 1.0
        for idx in order.tolist():
            j_out, i_in = divmod(idx, e.shape[1])
            ax.plot([p, p + 1], [-i_in, -j_out], color="tab:blue", alpha=0.7, zorder=2,
                    linewidth=0.3 + 4 * float(flat[idx]) / max(top, 1e-300))
    ax.set_xticks(range(len(result.layers)), result.layers, rotation=20, fontsize=8)
    ax.set_ylabel("direction (sorted by Λ; 0 = constant)")
    ax.set_title(f"{result.config.basis.upper()} interaction graph (top {top_k} edges per pair)")
    return _save(fig, path)


def plot_ablation(curves: AblationCurves, path: str | Path, label: str = "score") -> Path:
    """PNG with node-ablation curves (left) and edge-ablation bisection points (right) against kept k."""
    fig = Figure(figsize=(11, 4))
    for ax, table, xlabel in ((fig.add_subplot(1, 2, 1), curves.nodes, "kept directions"),
                              (fig.add_subplot(1, 2, 2), curves.edges, "kept edges")):
        for name, points in table.items():
            if points:
                ks, scores = zip(*points)
                ax.plot(ks, scores, marker=".", label=name)
        ax.axhline(curves.base, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("symlog")
        ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if table:
            ax.legend(fontsize=7)
    return _save(fig, path)
