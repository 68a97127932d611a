"""The cluster page: clusters.json (`decomp_hooks.clustering`) as one self-contained HTML page.

The page shows the settings, the MDL cost curve per merge step (inline SVG) with the kept step marked, and the clusters
at that step, largest first; a member links to its component on the site's dashboard page when `pages` says where
that page is. Every value from the file is escaped by the template engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from decomp_hooks import store
from decomp_hooks.dashboard import render

CURVE_WIDTH, CURVE_HEIGHT, CURVE_LEFT = 720, 160, 70  # pixels; the left margin holds the axis labels
CURVE_POINTS = 2000  # at most this many points of the cost curve are drawn


def write_cluster_page(clusters: Any, out_path: str | Path, pages: dict[str, str] | None = None,
                       title: str = "Component clusters") -> Path:
    """Write the page of `clusters` (a `Clusters`, the dict of clusters.json, or a path to one) to `out_path`,
    atomically; `pages` maps a site to its dashboard page (relative to the page), so members link to `page#c<index>`."""
    from decomp_hooks.clustering import Clusters, read_clusters

    data = clusters.to_dict() if isinstance(clusters, Clusters) else clusters
    data = read_clusters(data) if isinstance(data, (str, Path)) else data
    html = render.render("clusters.html.j2", title=title, **cluster_view(data, pages or {}))
    store.write_text(out_path, html)
    return Path(out_path)


def cluster_view(data: dict, pages: dict[str, str]) -> dict:
    """What the template shows: settings, the cost curve, and the clusters split into multi-member and single ones."""
    cfg, tokens = data["config"], data.get("tokens")
    groups = [group_view(g, tokens, pages) for g in data["clusters"]]
    multi = [g for g in groups if g["rank"] > 1]
    info = {"source": "exact (firing bits)" if cfg.get("exact") else "harvest pairwise counts (approximate)",
            "tokens": tokens if tokens is not None else "?", "threshold": cfg.get("threshold"),
            "alpha": cfg.get("alpha"), "rank_decay": cfg.get("rank_decay"), "seed": cfg.get("seed"),
            "components": len(data["components"]), "dead": len(data["dead"]), "chosen_step": data["chosen_step"],
            "steps": len(data["cost"]) - 1, "groups": len(groups), "multi": len(multi)}
    return {"info": info, "curve": curve_view(data["cost"], data["chosen_step"]), "multi": multi,
            "singles": [g for g in groups if g["rank"] == 1]}


def group_view(group: dict, tokens: int | None, pages: dict[str, str]) -> dict:
    """One cluster: its size, firing count and frequency, and its members as labels with links."""
    members = [{"label": f"{site}:{index}", "href": f"{quote(pages[site])}#c{index}" if site in pages else None}
               for site, index in group["members"]]
    return {"rank": group["rank"], "firing": group["firing"], "members": members,
            "frequency": group["firing"] / tokens if tokens else None}


def curve_view(cost: list[float], chosen: int) -> dict:
    """The cost curve as SVG polyline points (every step, or an even subsample and the kept step when there are more
    than CURVE_POINTS), its range, and the x of the kept step."""
    low, high = min(cost), max(cost)
    span, steps = (high - low) or 1.0, max(len(cost) - 1, 1)
    x = lambda i: CURVE_LEFT + (CURVE_WIDTH - CURVE_LEFT - 4) * i / steps  # noqa: E731
    y = lambda v: 4 + (CURVE_HEIGHT - 8) * (high - v) / span  # noqa: E731
    shown = sorted({*range(0, len(cost), -(-len(cost) // CURVE_POINTS)), chosen, len(cost) - 1})
    points = " ".join(f"{x(i):.1f},{y(cost[i]):.1f}" for i in shown)
    return {"points": points, "low": low, "high": high, "chosen_x": round(x(chosen), 1), "width": CURVE_WIDTH,
            "height": CURVE_HEIGHT}
