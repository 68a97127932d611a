"""Are the off entries of a dense site's CI pattern causally unimportant? An ablation check on the one-hot probes.

    python benchmarks/dense_sites.py runs/bench/tms_5-2-id-s0 --toy tms_5-2-id --seed 0
    python benchmarks/dense_sites.py runs/resid_mlp1

A run without a saved target/ (bench_toys.py runs) retrains its toy from `--toy`/`--seed`; do that with the thread count
it was trained with (bench_toys `--threads 1`: prefix OMP_NUM_THREADS=1), or the weights differ in the last bits and
loading refuses the decomposition (fingerprint mismatch).

For every dense site (TMS identity layer, ResidMLP `mlp_out`), takes the k heaviest components and, on each probe
x = 0.75·e_i, ablates one component at a time (all others and the delta component on) and measures the output MSE
against the target. A CI below 0.9 is right when that ablation changes nothing; an "always-on" pattern would need CI
near 1 there. Also prints each component's inner activation on the probe relative to its largest over the probes: the
per-component `mlp` CI function sees only that scalar, and it is the same (zero) on the all-zero input.
Last, the peak CI of each of the k components at several probe values (`--scales`): a peak that stays put as the
probe grows is a plateau of the trained CI function (where importance minimality balances reconstruction), not an
input too weak to switch the component fully on.
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


def _stats(values: torch.Tensor, **fns) -> dict[str, float]:
    """Named statistics of ``values`` (NaN when empty)."""
    return {name: float(fn(values)) if values.numel() else float("nan") for name, fn in fns.items()}


@torch.no_grad()
def ablation_table(dec, site: str, ci: torch.Tensor, heavy: torch.Tensor) -> dict[str, float]:
    """Output MSE when one of the heavy components is ablated on each probe, split by its probe CI ``ci`` (< or ≥ 0.9)."""
    from decomp_hooks import metrics

    n, k = dec.model.config.n_features, len(heavy)
    probes = metrics.one_hot_probes(n, device=dec.device)
    target = dec.run(probes, dec.site_masks()).float()
    # one batched forward: block j repeats the probes with component heavy[j] ablated
    masks = torch.ones(k, n, dec.components[site].C, device=dec.device)
    masks[torch.arange(k), :, heavy.to(dec.device)] = 0
    ablated = dec.run(probes.repeat(k, 1), dec.site_masks(masks={site: masks.reshape(k * n, -1)})).float()
    mse = ((ablated.reshape(k, n, -1) - target) ** 2).mean(-1).T.cpu()  # [n, k]: probe i, component heavy[j] ablated
    acts = dec.component_acts(probes)[site].float().cpu()[:, heavy].abs()
    rel_act = acts / acts.max(0).values.clamp_min(1e-12)
    ci_heavy = ci[:, heavy]
    off = ci_heavy < 0.9
    on_min = mse[~off].min() if (~off).any() else torch.tensor(float("inf"))
    costly = off & (mse > on_min)  # below 0.9, yet as costly to ablate as some entry at or above it
    return {"site": site, "k": k, "off_entries": int(off.sum()), "on_entries": int((~off).sum()),
            **_stats(mse[off], off_median_mse=torch.median, off_p99_mse=lambda v: v.quantile(0.99), off_max_mse=torch.max),
            **_stats(mse[~off], on_median_mse=torch.median, on_min_mse=torch.min),
            **_stats(rel_act[off], off_median_rel_act=torch.median, off_max_rel_act=torch.max),
            **_stats(rel_act[~off], on_median_rel_act=torch.median),
            "off_costly": int(costly.sum()), "off_costly_ci_le_0p1": int((costly & (ci_heavy <= 0.1)).sum())}


@torch.no_grad()
def peak_ci(dec, site: str, heavy: torch.Tensor, scales: list[float]) -> dict[float, list[float]]:
    """Per probe value v: the largest CI over the probes v·e_i of each heavy component, sorted."""
    from decomp_hooks import metrics

    n = dec.model.config.n_features
    return {v: dec.causal_importance(metrics.one_hot_probes(n, v, device=dec.device))[site].float().cpu()[:, heavy]
            .max(0).values.sort().values.tolist() for v in scales}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with decomposition/)")
    parser.add_argument("--toy", default=None, help="toy preset, for runs without a saved target/ (bench_toys runs)")
    parser.add_argument("--seed", type=int, default=0, help="the toy's training seed, with --toy")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                        help="probe values v (probes v·e_i) at which to print each heavy component's peak CI")
    args = parser.parse_args()
    from decomp_hooks import metrics
    from decomp_hooks.toy.evaluate import dense_k, probe_ci

    for run in args.runs:
        dec = load_run(run, args.toy, args.seed)
        ci = probe_ci(dec)
        for site in dec.site_names:
            k = dense_k(dec, site)
            if k is None:
                continue
            heavy = metrics.columns_by_mass(ci[site])[:k]
            row = ablation_table(dec, site, ci[site], heavy)
            print(f"{run.name} {site} (k={k}): {row['on_entries']} entries CI ≥ 0.9, {row['off_entries']} below")
            print(f"  ablation MSE  CI ≥ 0.9: median {row['on_median_mse']:.3g}, min {row['on_min_mse']:.3g}"
                  f"   CI < 0.9: median {row['off_median_mse']:.3g}, 99th pct {row['off_p99_mse']:.3g}, max {row['off_max_mse']:.3g}")
            print(f"  |inner act| / its max over probes  CI ≥ 0.9: median {row['on_median_rel_act']:.3f}"
                  f"   CI < 0.9: median {row['off_median_rel_act']:.3f}, max {row['off_max_rel_act']:.3f}")
            print(f"  entries with CI < 0.9 whose ablation costs more than the cheapest CI ≥ 0.9 entry: {row['off_costly']},"
                  f" of them {row['off_costly_ci_le_0p1']} with CI ≤ 0.1 (the rest partly on)")
            for v, peaks in peak_ci(dec, site, heavy, args.scales).items():
                print(f"  peak CI per component, probes {v:g}·e_i: min {peaks[0]:.4f}, median {peaks[len(peaks) // 2]:.4f},"
                      f" max {peaks[-1]:.4f}")


if __name__ == "__main__":
    main()
