"""Are the off entries of a dense site's CI pattern causally unimportant? An ablation check on the one-hot probes.

    python benchmarks/dense_sites.py runs/bench/tms_5-2-id-s0 --toy tms_5-2-id --seed 0
    python benchmarks/dense_sites.py runs/resid_mlp1

For every dense site (TMS identity layer, ResidMLP `mlp_out`), takes the k heaviest components and, on each probe
x = 0.75·e_i, ablates one component at a time (all others and the delta component on) and measures the output MSE
against the target. A CI below 0.9 is right when that ablation changes nothing; an "always-on" pattern would need CI
near 1 there. Also prints each component's inner activation on the probe relative to its largest over the probes: the
per-component `mlp` CI function sees only that scalar, and it is the same (zero) on the all-zero input.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def load_run(run: Path, toy: str | None, seed: int):
    """The decomposition of a run directory, with its saved target or the toy preset retrained with ``seed``."""
    import decomp_hooks as dh
    from decomp_hooks.toy import load_toy, make_toy

    if (run / "target" / "toy.json").is_file():
        return dh.load(run / "decomposition", model=load_toy(run / "target"))
    if toy is None:
        raise SystemExit(f"{run} has no saved target/; name the toy preset and seed it was trained with (--toy, --seed).")
    model, _ = make_toy(toy, seed=seed, progress=False)
    return dh.load(run / "decomposition", model=model)


@torch.no_grad()
def ablation_table(dec, site: str, k: int) -> dict[str, float]:
    """Output MSE when one of the k heaviest components is ablated on each probe, split by its CI (< or ≥ 0.9)."""
    from decomp_hooks import metrics
    from decomp_hooks.toy.evaluate import probe_ci

    n = dec.model.config.n_features
    probes = metrics.one_hot_probes(n, device=dec.device)
    ci = probe_ci(dec)[site]
    heavy = torch.argsort(ci.sum(0), descending=True)[:k]
    target = dec.run(probes, dec.site_masks()).float()
    acts = dec.component_acts(probes)[site].float().cpu()[:, heavy].abs()
    rel_act = acts / acts.max(0).values.clamp_min(1e-12)
    mse = torch.stack([((dec.run(probes, dec.site_masks(ablate={site: [int(c)]})).float() - target) ** 2).mean(-1).cpu()
                       for c in heavy], dim=1)  # [n, k]: probe i, component c ablated
    off = ci[:, heavy] < 0.9
    on_mse = mse[~off]
    costly = off & (mse > on_mse.min()) if on_mse.numel() else off & False  # off, yet as costly as some on entry
    return {"site": site, "k": k, "off_entries": int(off.sum()), "on_entries": int((~off).sum()),
            "off_max_mse": float(mse[off].max()) if off.any() else float("nan"),
            "off_p99_mse": float(mse[off].quantile(0.99)) if off.any() else float("nan"),
            "off_median_mse": float(mse[off].median()) if off.any() else float("nan"),
            "on_median_mse": float(on_mse.median()) if on_mse.numel() else float("nan"),
            "on_min_mse": float(on_mse.min()) if on_mse.numel() else float("nan"),
            "off_max_rel_act": float(rel_act[off].max()) if off.any() else float("nan"),
            "off_median_rel_act": float(rel_act[off].median()) if off.any() else float("nan"),
            "on_median_rel_act": float(rel_act[~off].median()) if (~off).any() else float("nan"),
            "off_costly": int(costly.sum()), "off_costly_ci_le_0p1": int((costly & (ci[:, heavy] <= 0.1)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with decomposition/)")
    parser.add_argument("--toy", default=None, help="toy preset, for runs without a saved target/ (bench_toys runs)")
    parser.add_argument("--seed", type=int, default=0, help="the toy's training seed, with --toy")
    args = parser.parse_args()
    from decomp_hooks.toy.evaluate import dense_k

    for run in args.runs:
        dec = load_run(run, args.toy, args.seed)
        for site in dec.site_names:
            k = dense_k(dec, site)
            if k is None:
                continue
            row = ablation_table(dec, site, k)
            print(f"{run.name} {site} (k={k}): {row['on_entries']} entries CI ≥ 0.9, {row['off_entries']} below")
            print(f"  ablation MSE  CI ≥ 0.9: median {row['on_median_mse']:.3g}, min {row['on_min_mse']:.3g}"
                  f"   CI < 0.9: median {row['off_median_mse']:.3g}, 99th pct {row['off_p99_mse']:.3g}, max {row['off_max_mse']:.3g}")
            print(f"  |inner act| / its max over probes  CI ≥ 0.9: median {row['on_median_rel_act']:.3f}"
                  f"   CI < 0.9: median {row['off_median_rel_act']:.3f}, max {row['off_max_rel_act']:.3f}")
            print(f"  entries with CI < 0.9 whose ablation costs more than the cheapest CI ≥ 0.9 entry: {row['off_costly']},"
                  f" of them {row['off_costly_ci_le_0p1']} with CI ≤ 0.1 (the rest partly on)")


if __name__ == "__main__":
    main()
