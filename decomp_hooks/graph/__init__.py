"""Attribution graphs between causally important components for one prompt (docs/graphs.md).

    graph = dec.attribution_graph("The cat sat on the", target=" mat")   # or dh.graph.attribution_graph(dec, ...)
    graph.save("graphs/cat")         # cat.json (Neuronpedia / circuit-tracer format), graph-metadata.json, cat.html
    print(graph.summary())           # nodes and edges before and after pruning, influence kept
"""
from __future__ import annotations

from decomp_hooks.graph.build import AttributionGraph, GraphSettings, attribution_graph
from decomp_hooks.graph.document import GraphNode
from decomp_hooks.graph.prompt import GraphError

__all__ = ["AttributionGraph", "GraphError", "GraphNode", "GraphSettings", "attribution_graph"]
