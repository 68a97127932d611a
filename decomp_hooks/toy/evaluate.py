"""Ground-truth metrics and plots for decompositions of the toy targets (methods.md §5, benchmarks.md §1)."""
from __future__ import annotations

from pathlib import Path

import torch

from decomp_hooks import metrics, plots
from decomp_hooks.decomposition import Decomposition
from decomp_hooks.toy.resid_mlp import ResidMLP
from decomp_hooks.toy.tms import TMSModel


def probe_ci(dec: Decomposition) -> dict[str, torch.Tensor]:
    """CI `[n_features, C]` per site on the one-hot probes x = 0.75·e_i."""
    n = dec.model.config.n_features
    return {k: v.float().cpu() for k, v in dec.causal_importance(metrics.one_hot_probes(n, device=dec.device)).items()}


def dense_k(dec: Decomposition, site: str) -> int | None:
    """How many always-on components a site should have: n_hidden for TMS identity layers, d_mlp for `mlp_out`."""
    model = dec.model
    if (isinstance(model, TMSModel) and site.startswith("hidden_layers")) or site.endswith(".pre_identity"):
        return dec.components[site].d_in
    if isinstance(model, ResidMLP) and site.endswith("mlp_out"):
        return model.config.d_mlp
    return None


def toy_metrics(dec: Decomposition, step: int | None = None) -> dict[str, float]:
    """MMCS/ML2R (TMS), identity or dense CI-pattern errors at tol 0.1 and 0.2 (dense: methods.md's error and the
    stricter always-on count of benchmarks.md's bar), and non-negligible components."""
    if not isinstance(dec.model, (TMSModel, ResidMLP)):
        return {}
    out: dict[str, float] = {}
    ci = probe_ci(dec)
    for site, comps in dec.components.items():
        V, U = comps.V.detach().float().cpu(), comps.U.detach().float().cpu()
        out[f"non_negligible/{site}"] = metrics.n_non_negligible(V, U, group_size=comps.group_size)
        if not dec.cm.ci_fns:  # no CI functions (APD): no CI patterns to score
            continue
        k = dense_k(dec, site)
        for tol in (0.1, 0.2):
            suffix = "" if tol == 0.1 else "_0p2"
            if k is None:
                out[f"identity_ci_error{suffix}/{site}"] = metrics.identity_ci_error(ci[site], tol)
            else:
                out[f"dense_ci_error{suffix}/{site}"] = metrics.dense_ci_error(ci[site], k, tol)
                out[f"dense_always_on_error{suffix}/{site}"] = metrics.dense_always_on_error(ci[site], k, tol)
    if dec.config.method == "apd":  # one mechanism per feature: the attributions on the one-hot probes
        from decomp_hooks.apd import mechanism_counts, probe_attributions

        probes = metrics.one_hot_probes(dec.model.config.n_features, device=dec.device)
        scores = probe_attributions(dec.cm, probes, dec.config.apd).float().cpu()
        out.update({f"apd/{k}": v for k, v in mechanism_counts(scores).items()})
    if isinstance(dec.model, TMSModel) and "linear1" in dec.components:
        c = dec.components["linear1"]
        W = dec.model.linear1.weight.detach().float().cpu()
        out["mmcs"], out["ml2r"] = metrics.mmcs_ml2r(c.V.detach().float().cpu(), c.U.detach().float().cpu(), W,
                                                     group_size=c.group_size)
    return out


def toy_plots(dec: Decomposition, out_dir: str | Path) -> list[Path]:
    """The permuted one-hot CI matrix and the U/V heatmaps of every site, as PNG files."""
    out_dir = Path(out_dir)
    paths = []
    for site, ci in probe_ci(dec).items():
        comps = dec.components[site]
        if not dec.cm.ci_fns:  # APD: no CI to plot; components in their own order
            paths.append(plots.plot_components(comps.V.detach().float().cpu(), comps.U.detach().float().cpu(),
                                               out_dir / f"components_{site}.png", f"components: {site}"))
            continue
        perm = metrics.permute_to_identity(ci)
        paths.append(plots.plot_ci_matrix(ci, out_dir / f"ci_{site}.png", f"causal importance on one-hot probes: {site}", perm))
        paths.append(plots.plot_components(comps.V.detach().float().cpu(), comps.U.detach().float().cpu(),
                                           out_dir / f"components_{site}.png", f"components: {site}", perm))
    return paths


def passes(record: dict, dec: Decomposition) -> bool:
    """The benchmarks.md success bars for the toy this decomposition targets (prefix-free metric names).

    Dense sites are scored with methods.md's dense error (SPD main's `DenseCIPattern`); `dense_always_on_error` is
    reported beside it but not required: an identity or `mlp_out` component whose input is zero on a probe is not
    needed there, and SPD's losses switch it off (`benchmarks/dense_sites.py` measures this by ablation)."""
    if dec.config.method == "apd":  # benchmarks.md §2: TMS MMCS ≥ 0.99 (ML2R reported); ResidMLP one mechanism per feature
        if "mmcs" in record:
            return bool(record["mmcs"] >= 0.99)
        return record.get("apd/split_features") == 0
    ok = all(v == 0 for k, v in record.items()
             if k.startswith(("identity_ci_error/", "dense_ci_error/")) and not _resid_identity(k))
    ok &= all(v <= 2 for k, v in record.items() if _resid_identity(k))
    if isinstance(dec.model, TMSModel):
        expected = {s: dense_k(dec, s) or dec.model.config.n_features for s in dec.components}
        ok &= all(record.get(f"non_negligible/{s}") == n for s, n in expected.items())
    if "mmcs" in record:  # benchmarks.md widens ML2R to 1.04 for 40-10+ID only (the paper reports 1.031 there)
        cfg = dec.model.config
        wide = cfg.n_identity_layers > 0 and cfg.n_features == 40
        ok &= record["mmcs"] >= 0.999 and 0.98 <= record["ml2r"] <= (1.04 if wide else 1.03)
    return bool(ok)


def _resid_identity(key: str) -> bool:
    return key.startswith("identity_ci_error/") and key.endswith("mlp_in")
