"""Attribution graphs on trained TMS 5-2 decompositions (the run directories of `bench_toys.py`): for a one-hot input
of feature i, does the strongest linear1 → linear2 edge join the two components that carry feature i?

The component that carries feature i at a site is found from the weights, as MMCS matches them: among the
non-negligible components, linear1's whose read vector v_c points most along input i, and linear2's whose write vector
u_c points most along output i (causal importance cannot tell: on a one-hot input several linear2 components have
CI 1, the interference the ReLU removes). An edge's attribution is to the target's activation a_t = x·v_t, whose scale
trades against ‖u_t‖ (v_t·k, u_t/k is the same component), so edges into different targets are compared as
attribution × ‖u_t‖: the attribution to what the target writes (the paper's display activation ‖u‖·a). Prints, per
run, how many of the 5 features pass and the strongest edge's share of all linear1 → linear2 attribution.

    python benchmarks/graph_toys.py runs/toys29f --configs tms_5-2 vpd_tms_5-2
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

import decomp_hooks as dh
from decomp_hooks import metrics
from decomp_hooks.toy import make_toy


def best_along(dec, site: str, side: str, i: int) -> int:
    """The non-negligible component of `site` whose read (V column) or write (U row) vector points most along axis i (either sign)."""
    comps = dec.components[site]
    V, U = comps.V.detach(), comps.U.detach()
    vectors = V.T if side == "read" else U
    cos = vectors[:, i].abs() / vectors.norm(dim=1).clamp_min(1e-12)  # a component is ±(v, u): either sign
    return int(cos.masked_fill(~metrics.non_negligible(V, U), -2.0).argmax())


def feature_check(dec, i: int) -> tuple[bool, float]:
    """(whether the strongest linear1 → linear2 edge joins feature i's components, that edge's share of |attr|)."""
    x = torch.zeros(1, 5)
    x[0, i] = 1.0
    carrier = {"linear1": best_along(dec, "linear1", "read", i), "linear2": best_along(dec, "linear2", "write", i)}
    graph = dec.attribution_graph(x[0], threshold=0.1)
    u_norm = dec.components["linear2"].U.detach().norm(dim=1)
    edges = [(abs(float(graph.adjacency[graph.nodes.index(t), graph.nodes.index(s)])) * float(u_norm[t.index]),
              s.index, t.index)
             for s in graph.find("component", "linear1") for t in graph.find("component", "linear2")]
    if not edges:
        return False, 0.0
    weight, s, t = max(edges)
    return (s, t) == (carrier["linear1"], carrier["linear2"]), weight / sum(e[0] for e in edges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="a bench_toys.py --out directory")
    parser.add_argument("--configs", nargs="+", default=["tms_5-2", "vpd_tms_5-2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("config | seed | features whose strongest linear1→linear2 edge joins their components | mean share")
    for config in args.configs:
        for run in sorted(args.runs.glob(f"{config}-s*"), key=lambda p: int(re.sub(r".*-s", "", p.name))):
            if not (run / "decomposition" / "decomposition.json").is_file():
                continue
            seed = int(run.name.rsplit("-s", 1)[1])
            model, _ = make_toy("tms_5-2", seed=seed, progress=False)
            dec = dh.load(run / "decomposition", model=model)
            checks = [feature_check(dec, i) for i in range(5)]
            print(f"{config} | {seed} | {sum(ok for ok, _ in checks)}/5 | "
                  f"{sum(share for _, share in checks) / 5:.2f}", flush=True)


if __name__ == "__main__":
    main()
