"""PNG plots of evaluation results: permuted CI matrices, V/U heatmaps and training curves.

Figures are built with ``matplotlib.figure.Figure`` (Agg rendering, no pyplot global state), so importing this
module never changes the user's backend. Each function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from decomp_hooks import store
from decomp_hooks.metrics import norms

_TICK_LIMIT = 40
_MAX_INCHES = (24.0, 16.0)  # beyond this a heatmap cell is under a pixel anyway; keeps APD's C·m columns drawable


def _figsize(width: float, height: float) -> tuple[float, float]:
    """A figure size that grows with the matrix drawn, capped at `_MAX_INCHES`."""
    return min(width, _MAX_INCHES[0]), min(height, _MAX_INCHES[1])


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to a temp file beside ``path`` and rename it into place, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with store.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _to_numpy(x: Tensor) -> np.ndarray:
    """Detached float CPU copy of a tensor."""
    return x.detach().float().cpu().numpy()


def _label_components(ax: Axes, axis: str, order: Tensor) -> None:
    """Tick a component axis with the original component indices when there are few enough to read."""
    if len(order) > _TICK_LIMIT:
        return
    positions, labels = range(len(order)), [str(i) for i in order.tolist()]
    if axis == "x":
        ax.set_xticks(positions, labels, fontsize=7, rotation=90)
    else:
        ax.set_yticks(positions, labels, fontsize=7)


def plot_ci_matrix(
    ci: Tensor, path: str | os.PathLike[str], title: str, permutation: Tensor | None = None
) -> Path:
    """Heatmap of a one-hot-probe CI matrix [n, C] (columns permuted if given), coloured on [0, 1]."""
    order = torch.arange(ci.shape[1]) if permutation is None else permutation.detach().cpu()
    fig = Figure(figsize=_figsize(max(4.0, 0.25 * len(order) + 2.0), max(3.0, 0.25 * ci.shape[0] + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(_to_numpy(ci[:, order.to(ci.device)]), vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, label="causal importance")
    ax.set(xlabel="component", ylabel="input feature", title=title)
    _label_components(ax, "x", order)
    return _save(fig, path)


def _diverging(ax: Axes, fig: Figure, values: np.ndarray, title: str, xlabel: str, ylabel: str) -> None:
    """Draw ``values`` with a red-blue colormap symmetric about 0, plus a colorbar."""
    limit = float(np.abs(values).max(initial=0.0)) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)


def plot_components(
    V: Tensor,
    U: Tensor,
    path: str | os.PathLike[str],
    title: str,
    permutation: Tensor | None = None,
    max_components: int | None = None,
) -> Path:
    """Side-by-side heatmaps of V [d_in, C] and U [C, d_out] in permutation order.

    With ``max_components``, only that many components of largest norm are drawn (in permutation order).
    """
    order = torch.arange(V.shape[1]) if permutation is None else permutation.detach().cpu()
    if max_components is not None and max_components < len(order):
        component_norms = norms(V, U).cpu()[order]
        order = order[torch.topk(component_norms, max_components).indices.sort().values]
    V_shown, U_shown = _to_numpy(V[:, order.to(V.device)]), _to_numpy(U[order.to(U.device)])
    fig = Figure(figsize=_figsize(max(8.0, 0.5 * len(order) + 6.0), max(3.5, 0.2 * max(V.shape[0], len(order)) + 2.0)))
    ax_v, ax_u = fig.subplots(1, 2)
    _diverging(ax_v, fig, V_shown, "V [d_in, C]", "component", "input dim")
    _diverging(ax_u, fig, U_shown, "U [C, d_out]", "output dim", "component")
    _label_components(ax_v, "x", order)
    _label_components(ax_u, "y", order)
    fig.suptitle(title)
    return _save(fig, path)


def plot_training_curves(
    records: list[dict[str, Any]], keys: list[str], path: str | os.PathLike[str], title: str = "training curves"
) -> Path:
    """Log-scale lines of ``keys`` against ``step`` from metrics.jsonl-style records; absent or non-finite values skip."""
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.add_subplot()
    for key in keys:
        points = [
            (r["step"], float(r[key]))
            for r in records
            if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="value", title=title)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_site_bars(panels: dict[str, dict[str, float]], path: str | os.PathLike[str], title: str = "per site") -> Path:
    """One bar chart per panel (e.g. CI-L0, alive components), sites along the x axis in the given order."""
    fig = Figure(figsize=_figsize(1.0 + 0.35 * max(len(v) for v in panels.values()), 2.6 * len(panels)))
    for i, (label, values) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        ax.bar(range(len(values)), list(values.values()))
        ax.set_ylabel(label)
        ax.set_xticks(range(len(values)), list(values), fontsize=7, rotation=90 if i == len(panels) - 1 else 0)
        if i < len(panels) - 1:
            ax.set_xticklabels([])
    fig.suptitle(title)
    return _save(fig, path)
