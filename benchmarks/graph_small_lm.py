"""Attribution graphs on the small language model's trained VPD decomposition (docs/graphs.md#the-small-language-model).

    python benchmarks/graph_small_lm.py                          # runs/lm_small/vpd-s0, three prompts
    python benchmarks/graph_small_lm.py --run runs/lm_small/spd-s0 --out runs/graphs-spd --threads 2

For each prompt: builds the graph (target: the top prediction), validates its JSON against Neuronpedia's graph
schema (tests/data/neuronpedia-graph-schema.json), writes the JSON and the HTML view under --out and checks the page
in headless Chromium where one is installed, and prints nodes and edges before and after pruning, the influence on
the target kept by the pruned graph, and the time (the median of three builds). Influence kept: with Â the absolute
adjacency normalised per row over the full graph, the share of the target's influence w (Â + Â² + …) that reaches
the source nodes (inputs, error nodes) over kept edges only. It is printed at the default pruning (thresholds raised
until ≥ 80 % is kept) and at circuit-tracer's fixed thresholds (0.8 nodes, 0.98 edges) on the same graph.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import decomp_hooks as dh
from decomp_hooks.graph.prune import prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' schema validator and page checker
from browser import check_page, chromium_path  # noqa: E402
from graph_schema import schema_errors  # noqa: E402

REPEATS = 3  # builds per prompt; the median time is printed (the machine may be shared)
PROMPTS = ["once upon a time there was a little girl named", "the cat sat on the", "she was very happy because"]


def load(run: Path) -> tuple[dh.Decomposition, Any]:
    """The run's decomposition on the model its config names (the small LM asset), and that model's tokenizer."""
    from decomp_hooks.config import from_dict
    from decomp_hooks.decomposition import read_meta
    from decomp_hooks.lm.model import ModelConfig, load_model

    path = run / "decomposition"
    loaded = load_model(from_dict(ModelConfig, read_meta(path)["config"]["model"]), "cpu", progress=False)
    return dh.load(path, model=loaded.model), loaded.tokenizer


def one(dec: dh.Decomposition, tokenizer: Any, prompt: str, out: Path) -> dict:
    """Build, validate, write and check one graph; its figures."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        graph = dec.attribution_graph(prompt, tokenizer=tokenizer)
        times.append(time.perf_counter() - start)
    doc = graph.to_json()
    problems = schema_errors(doc)
    paths = graph.save(out / graph.slug, overwrite=(out / graph.slug).exists())
    page = check_page(paths["html"]) if chromium_path() else None
    n_features = len(graph.find("component"))
    fixed = prune(graph.adjacency, torch.tensor([0.0] * (len(graph.nodes) - len(graph.targets)) +
                                                [t.weight for t in graph.targets]),
                  n_features, len(graph.find("input")) + len(graph.targets), 0.8, 0.98)
    return {"prompt": prompt, "target": graph.targets[0].label, "p": graph.targets[0].weight,
            "nodes": len(graph.nodes), "edges": graph.n_edges, "kept_nodes": graph.n_kept_nodes,
            "kept_edges": graph.n_kept_edges, "kept": graph.pruned.influence_kept,
            "thresholds": (graph.pruned.node_threshold, graph.pruned.edge_threshold),
            "fixed_kept": fixed.influence_kept, "fixed_nodes": int(fixed.node_mask.sum()),
            "fixed_edges": int(fixed.edge_mask.sum()), "seconds": statistics.median(times), "schema": problems,
            "page": "no Chromium" if page is None else
            f"console errors {len(page.errors)}, external requests {len(page.external_requests)}",
            "html": paths["html"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/lm_small/vpd-s0"))
    parser.add_argument("--out", type=Path, default=Path("runs/graphs_small_lm"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dec, tokenizer = load(args.run)
    print(f"{dec!r}")
    dec.attribution_graph(PROMPTS[0], tokenizer=tokenizer)  # warm-up: the timings below are steady-state
    for prompt in PROMPTS:
        r = one(dec, tokenizer, prompt, args.out)
        print(f"\n{r['prompt']!r} -> {r['target']!r} (p={r['p']:.3f})\n"
              f"  nodes {r['nodes']} -> {r['kept_nodes']}, edges {r['edges']} -> {r['kept_edges']} "
              f"(node/edge thresholds {r['thresholds'][0]:.4g}/{r['thresholds'][1]:.4g}), influence kept "
              f"{100 * r['kept']:.1f}%, {r['seconds']:.2f} s (median of {REPEATS} builds)\n"
              f"  circuit-tracer's fixed 0.8/0.98: nodes {r['fixed_nodes']}, edges {r['fixed_edges']}, influence kept "
              f"{100 * r['fixed_kept']:.1f}%\n"
              f"  schema: {'valid' if not r['schema'] else r['schema'][:3]}; page {r['html']}: {r['page']}")


if __name__ == "__main__":
    main()
