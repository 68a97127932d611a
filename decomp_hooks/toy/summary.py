"""The end-of-run summary of a toy decomposition: every final figure with what it means, the bar it is held to and
whether it passed, then where the plots and files are."""
from __future__ import annotations

from pathlib import Path

from decomp_hooks.decomposition import Decomposition
from decomp_hooks.toy.evaluate import bar_checks

#: what each figure means, by its name before any "/site"
MEANINGS = {
    "mmcs": "mean over the toy's features of the best cosine similarity with a component (1: every feature found)",
    "ml2r": "mean norm ratio of those best-matching components to their features (1: found at the right size)",
    "non_negligible": "components whose weights are not negligible (the toy needs one per feature)",
    "identity_ci_error": "entries of the CI on one-hot feature probes that break one-component-per-feature (CI off by "
                         "> 0.1)",
    "identity_ci_error_0p2": "the same at tolerance 0.2",
    "dense_ci_error": "entries of the probes' CI that break 'k components on, the others off' (tolerance 0.1)",
    "dense_ci_error_0p2": "the same at tolerance 0.2",
    "dense_always_on_error": "the stricter 'k components on for every probe' (tolerance 0.1; not a bar)",
    "dense_always_on_error_0p2": "the same at tolerance 0.2",
    "faithfulness": "mean squared difference between the target's weights and the summed components",
    "unmasked_recon": "output MSE with every component on",
    "ci_recon": "output MSE with components masked by their CI",
    "stochastic_recon": "output MSE with stochastic masks between CI and 1",
    "pgd_probe": "output MSE under the worst masks a 20-step adversary finds between CI and 1",
    "ci_l0": "mean number of components per input with CI above ci_alive_threshold, all sites",
    "l0": "the same for one site",
    "live": "components of the site with CI above ci_alive_threshold on some input of the evaluation batch",
    "apd/split_features": "features whose mechanism is split over several components",
}


def _number(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def toy_summary(dec: Decomposition, out: Path, plots: list[Path]) -> str:
    """The final metrics as a table (value, bar, verdict, meaning), the overall verdict, and the files written."""
    record = {k.removeprefix("eval/"): v for k, v in dec.final_metrics().items() if k != "step"}
    checks = {c.metric: c for c in bar_checks(record, dec)}
    rows = [("figure", "value", "bar", "", "meaning")]
    for k, v in record.items():
        c = checks.get(k)
        meaning = MEANINGS.get(k, MEANINGS.get(k.split("/")[0], ""))
        rows.append((k, _number(v), c.bar if c else "", ("pass" if c.ok else "FAIL") if c else "", meaning))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    failed = [c.metric for c in checks.values() if not c.ok]
    verdict = ("PASS: every bar met" if not failed else f"FAIL: {len(failed)} of {len(checks)} bars missed "
               f"({', '.join(failed)})")
    lines += ["", f"ground truth ({len(checks)} bars, the SPD paper's success criteria for this toy): {verdict}",
              f"run directory {out}: decomposition/ (safetensors + JSON, reload with decomp_hooks.load), "
              "metrics.jsonl (every logged step), config.yaml, checkpoints/, target/ (the toy model)",
              "plots: " + ", ".join(p.name for p in plots) + " (ci_*: causal importance of each component on one-hot "
              "feature probes; components_*: the components' weights, in the features' order)"]
    return "\n".join(lines)
