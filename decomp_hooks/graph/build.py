"""An attribution graph for one prompt (docs/graphs.md): the causally important components as nodes, direct-path
attributions as edges, pruned to what carries the influence on the chosen outputs; written as the JSON the graph
viewers read and as an offline HTML page."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from decomp_hooks import store
from decomp_hooks.decomposition import package_versions
from decomp_hooks.graph.attribution import OUTPUT, Sources, TargetNodes, attribution_rows, releafed_forward
from decomp_hooks.graph.document import GraphMeta, GraphNode, document, node_json
from decomp_hooks.graph.html import render_html
from decomp_hooks.graph.inputs import INPUT_KINDS
from decomp_hooks.graph.prompt import GraphError, Prompt, Target, check_fraction, read_prompt, read_targets
from decomp_hooks.graph.prune import Pruned, prune_keeping

ATTRIBUTION = ("attr(c' -> c) = (da_c/da_c')* . a_c' . g_c' with a = x V: every component activation detached and "
               "re-leafed, so only direct paths count (delta components unmasked); input nodes (da_c/de).e; output "
               "nodes are the raw target values (logits)")
INFLUENCE_MEASURE = ("influence_kept: with A_hat = |A| row-normalised over the full graph and w the target weights, "
                     "the share of w (A_hat + A_hat^2 + ...) reaching source nodes (inputs, error nodes) when only "
                     "kept edges are followed; node_influence_kept: the kept nodes' share of the node influence "
                     "w A_hat (I - A_hat)^-1")
_SLUG = re.compile(r"[A-Za-z0-9_-]{1,100}")


@dataclass
class GraphSettings:
    """How a graph is built and pruned (checked when made)."""

    threshold: float = 0.1
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    min_influence_kept: float = 0.8
    max_nodes: int = 2048
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_fraction("threshold", self.threshold, 0.0, 1.0, high_included=False)
        for name in ("node_threshold", "edge_threshold", "min_influence_kept"):
            check_fraction(name, getattr(self, name), 0.0, 1.0)
        for name in ("max_nodes", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GraphError(f"{name}={value!r}: must be an integer ≥ 1.")


@dataclass
class AttributionGraph:
    """The full graph (`nodes`, `adjacency[target, source]`), what pruning keeps (`pruned`), and where it came from.

    `to_json()` is the Neuronpedia / circuit-tracer graph document of the pruned graph, `html()` its offline page,
    `save(dir)` writes both; `incoming(node)` lists a node's sources by attribution size."""

    nodes: list[GraphNode]
    adjacency: torch.Tensor
    pruned: Pruned
    prompt: Prompt
    targets: list[Target]
    layers: list[tuple[str, int]]
    settings: GraphSettings
    model_name: str
    method: str
    seconds: float
    slug: str = "graph"
    created: float = field(default_factory=time.time)

    @property
    def n_edges(self) -> int:
        return int((self.adjacency != 0).sum())

    @property
    def n_kept_nodes(self) -> int:
        return int(self.pruned.node_mask.sum())

    @property
    def n_kept_edges(self) -> int:
        return int(self.pruned.edge_mask.sum())

    def incoming(self, node: GraphNode, pruned: bool = False) -> list[tuple[GraphNode, float]]:
        """`node`'s sources with their attributions, largest in size first (kept edges only with `pruned`)."""
        i = self.nodes.index(node)
        row = self.adjacency[i] * self.pruned.edge_mask[i] if pruned else self.adjacency[i]
        order = row.abs().argsort(descending=True)
        return [(self.nodes[j], float(row[j])) for j in order.tolist() if row[j] != 0]

    def find(self, kind: str, site: str | None = None, pos: int | None = None,
             index: int | None = None) -> list[GraphNode]:
        """The nodes of a kind, optionally at a site, position and index."""
        return [n for n in self.nodes if n.kind == kind and site in (None, n.site) and pos in (None, n.pos)
                and index in (None, n.index)]

    def to_json(self) -> dict[str, Any]:
        """The pruned graph as the attribution-graph JSON (nodes, links, metadata) the graph viewers read."""
        keep = self.pruned.node_mask
        ids, nodes = {}, []
        first_target = len(self.nodes) - len(self.targets)
        for i in keep.nonzero().flatten().tolist():
            doc = node_json(self.nodes[i], len(self.layers), float(self.pruned.cumulative[i]), i == first_target)
            ids[i] = doc["node_id"]
            nodes.append(doc)
        dst, src = self.pruned.edge_mask.nonzero(as_tuple=True)
        links = [{"source": ids[s], "target": ids[d], "weight": float(self.adjacency[d, s])}
                 for d, s in zip(dst.tolist(), src.tolist()) if s in ids and d in ids]
        return document(self._meta(), package_versions()["decomp-hooks"] or "unknown", nodes, links)

    def html(self) -> str:
        """A self-contained page drawing the pruned graph (no network, inline script and style)."""
        return render_html(self.to_json())

    def save(self, path: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """Write `<slug>.json`, `graph-metadata.json` (circuit-tracer's graph list) and `<slug>.html` into directory
        `path`, atomically; returns the JSON and HTML paths."""
        path = Path(path)
        doc = self.to_json()
        with store.atomic_dir(path, overwrite=store.replaceable_dir(path, overwrite, GraphError)) as tmp:
            store.write_json(tmp / f"{self.slug}.json", doc)
            store.write_json(tmp / "graph-metadata.json", {"graphs": [doc["metadata"]]})
            store.write_text(tmp / f"{self.slug}.html", render_html(doc))
        return {"json": path / f"{self.slug}.json", "html": path / f"{self.slug}.html"}

    def summary(self) -> str:
        """One line: prompt, targets, node and edge counts before and after pruning, influence kept, time."""
        shown = ", ".join(f"{t.label!r} ({t.weight:.3f})" for t in self.targets)
        p = self.pruned
        return (f"{self.prompt.text!r} -> {shown}: nodes {len(self.nodes)} -> {self.n_kept_nodes}, edges "
                f"{self.n_edges} -> {self.n_kept_edges} (node/edge thresholds {p.node_threshold:.4g}/"
                f"{p.edge_threshold:.4g}), influence kept {100 * p.influence_kept:.1f}% (node influence "
                f"{100 * p.node_influence_kept:.1f}%), {self.seconds:.2f} s")

    def _meta(self) -> GraphMeta:
        s = self.settings
        extra = {"method": self.method, "model": self.model_name, "attribution": ATTRIBUTION,
                 "layers": [{"layer": i, "site": n, "C": C} for i, (n, C) in enumerate(self.layers)],
                 "targets": [{"label": t.label, "index": t.index, "value": t.value, "weight": t.weight}
                             for t in self.targets],
                 "counts": {"nodes": len(self.nodes), "edges": self.n_edges, "kept_nodes": self.n_kept_nodes,
                            "kept_edges": self.n_kept_edges},
                 "influence_kept": self.pruned.influence_kept,
                 "node_influence_kept": self.pruned.node_influence_kept,
                 "influence_measure": INFLUENCE_MEASURE, "seconds": self.seconds}
        return GraphMeta(self.slug, self.model_name, self.prompt.text, self.prompt.labels, self.created,
                         {"ci_threshold": s.threshold, "max_feature_nodes": s.max_nodes, "batch_size": s.batch_size},
                         {"node_threshold": self.pruned.node_threshold, "edge_threshold": self.pruned.edge_threshold,
                          "requested_node_threshold": s.node_threshold, "requested_edge_threshold": s.edge_threshold,
                          "min_influence_kept": s.min_influence_kept}, extra)


def attribution_graph(dec: Any, prompt: Any, target: Any = None, threshold: float = 0.1, node_threshold: float = 0.8,
                      edge_threshold: float = 0.98, min_influence_kept: float = 0.8, max_nodes: int = 2048,
                      batch_size: int = 64, tokenizer: Any = None, slug: str | None = None,
                      model_name: str | None = None) -> AttributionGraph:
    """The attribution graph of `dec`'s components on `prompt` (text, token ids, or one input vector).

    Nodes: components with causal importance above `threshold` at each position (at most `max_nodes`, the largest
    `g·|‖u_c‖ a_c|` first; the rest of a site at a position form its error node), the inputs, and the `target` outputs
    at the last position (token strings, ids or output indices; default: the top prediction). Edges: direct-path
    attributions `(∂a_c/∂a_c′)* · a_c′ · g_c′` (docs/graphs.md), `batch_size` targets per backward. Pruning keeps the
    nodes holding `node_threshold` of the influence on the targets, then the edges holding `edge_threshold`, both
    raised toward 1 until the pruned graph keeps `min_influence_kept` of the influence (docs/graphs.md#pruning)."""
    from decomp_hooks.adapters import adapter_for

    start = time.perf_counter()
    settings = GraphSettings(threshold, node_threshold, edge_threshold, min_influence_kept, max_nodes, batch_size)
    adapter = adapter_for(dec.model)
    context = adapter.model_context(dec.model)
    p = read_prompt(dec.model, prompt, tokenizer or adapter.tokenizer(dec.model), context.get("context_size"))
    p.batch = p.batch.to(dec.device)
    targets = read_targets(dec.model, p, target)
    ci, acts, display = _measure(dec, p.batch)
    nodes, A, order = _attribute(dec, p, targets, ci, acts, display, select_components(ci, display, settings),
                                 batch_size)
    weights = torch.tensor([n.weight for n in nodes])
    n_fixed = sum(n.kind in ("input", "logit") for n in nodes)
    pruned = prune_keeping(A, weights, sum(n.kind == "component" for n in nodes), n_fixed, node_threshold,
                           edge_threshold, min_influence_kept)
    return AttributionGraph(nodes, A, pruned, p, targets, [(n, dec.components[n].C) for n in order], settings,
                            model_name or _model_name(dec, context), dec.config.method,
                            time.perf_counter() - start, _slug(slug, p))


def _measure(dec: Any, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], ...]:
    """Per site `[P, C]`: causal importance g, activations a = x V, and display activations ‖u_c‖·a_c."""
    ci = {n: v.reshape(-1, v.shape[-1]).float() for n, v in dec.causal_importance(batch).items()}
    acts = {n: v.reshape(-1, v.shape[-1]).float() for n, v in dec.component_acts(batch).items()}
    return ci, acts, {n: acts[n] * dec.components[n].U.detach().norm(dim=-1) for n in acts}


def _attribute(dec: Any, p: Prompt, targets: list[Target], ci: dict[str, torch.Tensor], acts: dict[str, torch.Tensor],
               display: dict[str, torch.Tensor], selected: dict[str, torch.Tensor],
               batch_size: int) -> tuple[list[GraphNode], torch.Tensor, list[str]]:
    """The nodes, the adjacency `[target, source]` and the sites in forward order, from one re-leafed forward."""
    inputs = INPUT_KINDS[p.reads_tokens]()
    copies = min(batch_size, int(sum(s.sum() for s in selected.values())) + len(targets))
    fwd = releafed_forward(dec.cm, p.batch.expand(copies, *p.batch.shape[1:]), inputs)
    selected = {n: selected[n] for n in fwd.order}
    input_nodes = inputs.nodes(p.batch, p.labels) if fwd.input_leaf is not None else []
    sources = Sources(fwd.order, selected, {n: acts[n] * ci[n] for n in fwd.order}, inputs, input_nodes)
    n_pos = next(iter(ci.values())).shape[0]
    nodes, target_nodes = _nodes(fwd.order, selected, display, input_nodes, targets, n_pos)
    return nodes, _adjacency(attribution_rows(fwd, sources, target_nodes), len(nodes), len(targets)), fwd.order


def select_components(ci: dict[str, torch.Tensor], display: dict[str, torch.Tensor],
                      settings: GraphSettings) -> dict[str, torch.Tensor]:
    """Per site, `[P, C]`: CI above the threshold, capped at `max_nodes` over all sites by `g·|display activation|`."""
    selected = {n: g > settings.threshold for n, g in ci.items()}
    scores = torch.cat([torch.where(selected[n], ci[n] * display[n].abs(), -1.0).flatten() for n in ci])
    if int((scores >= 0).sum()) <= settings.max_nodes:
        return selected
    floor = scores.topk(settings.max_nodes).values[-1]
    return {n: selected[n] & (ci[n] * display[n].abs() >= floor) for n in ci}


def _nodes(order: list[str], selected: dict[str, torch.Tensor], display: dict[str, torch.Tensor],
           input_nodes: list, targets: list[Target], n_pos: int) -> tuple[list[GraphNode], TargetNodes]:
    """Every node in adjacency order (components site by site, error nodes, inputs, outputs) and the targets to
    differentiate (the components, then the outputs)."""
    comps = [GraphNode("component", layer, p, c, c, name, a, f"{name} #{c}")
             for layer, name in enumerate(order)
             for (p, c), a in zip(selected[name].nonzero().tolist(), display[name][selected[name]].tolist())]
    errors = [GraphNode("error", layer, p, -1, -1, name, None, f"{name}: components not in the graph")
              for layer, name in enumerate(order) for p in range(n_pos)]
    ins = [GraphNode("input", None, n.pos, n.index, n.column, None, None, n.label) for n in input_nodes]
    outs = [GraphNode("logit", len(order), n_pos - 1, t.index, t.index, None, t.value,
                      f'Output "{t.label}" (p={t.weight:.3f})', t.weight) for t in targets]
    keys = [n.site for n in comps] + [OUTPUT] * len(outs)
    pos = torch.tensor([n.pos for n in comps + outs])
    index = torch.tensor([n.index for n in comps + outs])
    return comps + errors + ins + outs, TargetNodes(keys, pos, index)


def _adjacency(rows: torch.Tensor, n_nodes: int, n_targets: int) -> torch.Tensor:
    """`A[target, source]` over all nodes from the rows of the component and output targets."""
    A = torch.zeros(n_nodes, n_nodes)
    n_comps = rows.shape[0] - n_targets
    A[:n_comps, : rows.shape[1]] = rows[:n_comps].cpu()
    A[n_nodes - n_targets:, : rows.shape[1]] = rows[n_comps:].cpu()
    return A


def _model_name(dec: Any, context: dict) -> str:
    """The model's name for `metadata.scan`: the run's provenance or configured model, else the toolkit's name."""
    configured = getattr(getattr(dec.config, "model", None), "source", None)
    return str(dec.provenance.get("model") or configured or context.get("model_name") or type(dec.model).__name__)


def _slug(slug: str | None, prompt: Prompt) -> str:
    """The given slug (checked: it names files) or one made from the prompt."""
    if slug is None:
        return re.sub(r"[^a-z0-9]+", "-", prompt.text.lower()).strip("-")[:48].strip("-") or "graph"
    if not _SLUG.fullmatch(slug):
        raise GraphError(f"slug={slug!r}: use 1-100 letters, digits, '-' or '_' (it names the output files).")
    return slug
