"""The attribution-graph JSON that Neuronpedia's graph viewer and circuit-tracer's local server read
(docs/graphs.md#the-json-format): `metadata`, `qParams`, `nodes` and `links`, written the way circuit-tracer's
`create_graph_files` writes them, validated against Neuronpedia's `graph-schema.json` (tests/data/).

Each node kind has one writer. Components are `"cross layer transcoder"` nodes (the feature type both viewers draw
and score as a feature), the components left out of a site at a position are its `"mlp reconstruction error"`
node, token embeddings (or a vector's entries) are `"embedding"` nodes in layer `"E"`, and the targets are `"logit"`
nodes. `layer` is the site's place in the forward pass; `metadata.decomp_hooks` says which site each layer is.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMAT = "decomp-hooks/attribution-graph"
VERSION = 1
QPARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}


@dataclass
class GraphNode:
    """One node: its kind (component, error, input or logit), layer (None for inputs), position, index (component,
    token id, input entry or output), feature number (the index; for inputs their column: the position of a token,
    the entry of a vector), site, activation (components: ‖u_c‖·a_c), label and target weight."""

    kind: str
    layer: int | None
    pos: int
    index: int
    feature: int
    site: str | None
    activation: float | None
    label: str
    weight: float = 0.0


def _component(n: GraphNode, n_layers: int) -> dict[str, Any]:
    """A component: `<layer>_<component>_<position>`, a feature node to both viewers."""
    return {"node_id": f"{n.layer}_{n.index}_{n.pos}", "feature": n.feature, "layer": str(n.layer),
            "feature_type": "cross layer transcoder", "jsNodeId": f"{n.layer}_{n.index}-{n.pos}"}


def _error(n: GraphNode, n_layers: int) -> dict[str, Any]:
    """A site's left-out components at a position (circuit-tracer's `0_<layer>_<pos>` id can clash with a feature's)."""
    return {"node_id": f"{n.layer}_err_{n.pos}", "feature": n.feature, "layer": str(n.layer),
            "feature_type": "mlp reconstruction error", "jsNodeId": f"{n.layer}_err-{n.pos}"}


def _input(n: GraphNode, n_layers: int) -> dict[str, Any]:
    """A token embedding (or vector entry): `E_<token id>_<position>` in layer `E`, as circuit-tracer writes it."""
    return {"node_id": f"E_{n.index}_{n.pos}", "feature": n.feature,
            "layer": "E", "feature_type": "embedding", "jsNodeId": f"E_{n.index}-{n.pos}"}


def _logit(n: GraphNode, n_layers: int) -> dict[str, Any]:
    """A target output: `<n_layers>_<token id>_<position>` above the last layer, with its probability."""
    return {"node_id": f"{n_layers}_{n.index}_{n.pos}", "feature": n.feature, "layer": str(n_layers),
            "feature_type": "logit", "jsNodeId": f"L_{n.index}-{n.pos}", "token_prob": n.weight}


#: how each node kind is written (the fields circuit-tracer's `Node` has beyond these are filled in by `node_json`)
NODE_WRITERS: dict[str, Callable[[GraphNode, int], dict[str, Any]]] = {
    "component": _component, "error": _error, "input": _input, "logit": _logit}


def node_json(n: GraphNode, n_layers: int, influence: float, target: bool) -> dict[str, Any]:
    """A node with every field of circuit-tracer's `Node`."""
    return {"token_prob": 0.0, **NODE_WRITERS[n.kind](n, n_layers), "ctx_idx": n.pos, "is_target_logit": target,
            "run_idx": 0, "reverse_ctx_idx": 0, "clerp": n.label, "influence": influence, "activation": n.activation}


@dataclass
class GraphMeta:
    """What the metadata says besides the nodes: the prompt, the model, the settings and the decomp-hooks block."""

    slug: str
    scan: str
    prompt: str
    prompt_tokens: list[str]
    created: float
    generation: dict[str, Any]
    pruning: dict[str, float]
    decomp_hooks: dict[str, Any]


def metadata(meta: GraphMeta, version: str) -> dict[str, Any]:
    """The `metadata` object: the schema's required fields, circuit-tracer's, and `decomp_hooks`."""
    return {"slug": meta.slug, "scan": meta.scan, "transcoder_list": [], "prompt_tokens": meta.prompt_tokens,
            "prompt": meta.prompt, "node_threshold": meta.pruning["node_threshold"],
            "info": {"description": f"decomp-hooks attribution graph between parameter components on {meta.scan}",
                     "generator": {"name": "decomp-hooks", "version": version},
                     "create_time_ms": int(meta.created * 1000)},
            "generation_settings": meta.generation, "pruning_settings": meta.pruning,
            "decomp_hooks": {"format": FORMAT, "version": VERSION, **meta.decomp_hooks}}


def document(meta: GraphMeta, version: str, nodes: list[dict[str, Any]], links: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole graph file."""
    return {"metadata": metadata(meta, version), "qParams": dict(QPARAMS), "nodes": nodes, "links": links}
