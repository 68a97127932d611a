"""The evaluation report of a language-model run (docs/lm.md#evaluation): `eval.json`, PNG plots (training curves,
KL per mask type over training, CI-L0 and alive components per site) and the table printed at the end."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from decomp_hooks import plots, store
from decomp_hooks.decomposition import Decomposition
from decomp_hooks.lm.metrics import MASK_TYPES

MASKS = (*MASK_TYPES, "adversarial")


def eval_summary(dec: Decomposition) -> dict[str, Any]:
    """The final evaluation as nested tables: per mask type KL / CE / ΔCE / CE unrecovered; per site C, CI-L0 and
    alive components; totals; the run's provenance."""
    final = {k.removeprefix("eval/"): v for k, v in dec.final_metrics().items()}
    masks = {m: {"kl": final.get(f"kl_{m}"), "ce": final.get(f"ce_{m}"), "ce_difference": final.get(f"ce_difference_{m}"),
                 "ce_unrecovered": final.get(f"ce_unrecovered_{m}")} for m in MASKS if f"kl_{m}" in final}
    sites = {n: {"C": dec.cm.component(n).C, "l0": final.get(f"l0/{n}"), "alive": final.get(f"live/{n}")}
             for n in dec.site_names}
    totals = {"C": sum(s["C"] for s in sites.values()), "l0": final.get("l0/total"), "alive": final.get("live/total")}
    return {"step": final.get("step"), "method": dec.config.method, "ce_target": final.get("ce_target"),
            "faithfulness": final.get("faithfulness"), "eval_positions": final.get("eval_positions"),
            "alive_threshold": dec.config.ci_alive_threshold, "masks": masks, "sites": sites, "total": totals,
            "provenance": dec.provenance}


def write_report(dec: Decomposition, out_dir: str | Path) -> dict[str, Any]:
    """Write `eval.json` and the PNG plots into `out_dir`; returns the summary."""
    out_dir = Path(out_dir)
    summary = eval_summary(dec)
    store.write_json(out_dir / "eval.json", summary)
    train_keys = sorted({k for r in dec.metrics for k in r if k.startswith("train/") and "/l0/" not in k
                         and k not in ("train/lr", "train/importance_p", "train/adversary_lr")})
    plots.plot_training_curves(dec.metrics, train_keys, out_dir / "training_curves.png", "training losses")
    plots.plot_training_curves(dec.metrics, [f"eval/kl_{m}" for m in MASKS], out_dir / "eval_kl.png",
                               "held-out KL to the target, per mask type")
    sites = summary["sites"]
    plots.plot_site_bars({"CI-L0": {n: s["l0"] or 0 for n, s in sites.items()},
                          "alive": {n: s["alive"] or 0 for n, s in sites.items()}},
                         out_dir / "sites.png", f"per site (CI > {dec.config.ci_alive_threshold})")
    return summary


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def report_table(summary: dict[str, Any]) -> str:
    """The summary as two plain-text tables: masks (KL, CE, ΔCE, unrecovered) and sites (C, L0, alive)."""
    lines = [f"CE target {_fmt(summary['ce_target'])}   faithfulness {_fmt(summary['faithfulness'])}   "
             f"held-out positions {_fmt(summary['eval_positions'])}",
             f"{'mask':<16}{'KL':>10}{'CE':>10}{'ΔCE':>10}{'unrecovered':>13}"]
    for m, v in summary["masks"].items():
        unrec = v["ce_unrecovered"]
        lines.append(f"{m:<16}{_fmt(v['kl']):>10}{_fmt(v['ce']):>10}{_fmt(v['ce_difference']):>10}"
                     f"{'-' if unrec is None else f'{100 * unrec:.1f}%':>13}")
    width = max(len(n) for n in [*summary["sites"], "total"])
    lines.append(f"{'site':<{width}}  {'C':>6} {'CI-L0':>8} {'alive':>6}")
    for n, s in {**summary["sites"], "total": summary["total"]}.items():
        lines.append(f"{n:<{width}}  {s['C']:>6} {_fmt(s['l0']):>8} {_fmt(s['alive']):>6}")
    return "\n".join(lines)
