"""SPD and VPD on every matrix of the small language model (docs/lm.md#the-small-language-model), several seeds,
the same budget: held-out CE unrecovered and KL under each mask type, CI-L0, alive components per site, wall time,
and the bars of docs/results.md#language-models.

    python benchmarks/lm_small.py                       # SPD and VPD, seeds 0 1 2, the configs' steps
    python benchmarks/lm_small.py --methods vpd --seeds 0 --steps 200 --threads 2

Runs one at a time (2 torch threads by default); each writes its run directory under --out, and a finished one is
read back instead of trained again. Prints one row per run and, per seed, the methods side by side.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

#: the bars: CI-masked CE unrecovered, unmasked CE unrecovered, total CI-L0 as a fraction of total C
BARS = {"ci_unrecovered": 0.10, "unmasked_unrecovered": 0.01, "l0_fraction": 0.05}


def run(method: str, seed: int, steps: int | None, out: Path) -> dict:
    """Decompose the small LM with the shipped config lm/small_<method> (or read a finished run); its summary row."""
    import decomp_hooks as dh
    from decomp_hooks.lm.report import eval_summary, write_report
    from decomp_hooks.lm.run import run_lm

    done = out / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = dh.load_config(f"lm/small_{method}")
    start = time.perf_counter()
    dec = run_lm(cfg, out, steps, "cpu", seed, False, True)
    wall = time.perf_counter() - start
    summary = write_report(dec, out)
    row = row_of(method, seed, summary, wall, eval_summary(dec)["step"])
    done.write_text(json.dumps(row))
    return row


def row_of(method: str, seed: int, s: dict, wall: float, steps: int) -> dict:
    """The figures of one run from its evaluation summary."""
    m = s["masks"]
    row = {"method": method, "seed": seed, "steps": steps, "wall_s": wall, "ce_target": s["ce_target"],
           **{f"{k}_ce_unrecovered": m[k]["ce_unrecovered"] for k in ("ci_masked", "unmasked", "stoch_masked",
                                                                        "rounded_masked", "adversarial")},
           **{f"{k}_kl": m[k]["kl"] for k in ("ci_masked", "unmasked", "stoch_masked", "rounded_masked", "adversarial")},
           "l0": s["total"]["l0"], "C": s["total"]["C"], "alive": s["total"]["alive"],
           "alive_per_site": {n: v["alive"] for n, v in s["sites"].items()},
           "l0_per_site": {n: v["l0"] for n, v in s["sites"].items()}}
    row["passes"] = (row["ci_masked_ce_unrecovered"] <= BARS["ci_unrecovered"]
                     and row["unmasked_ce_unrecovered"] <= BARS["unmasked_unrecovered"]
                     and row["l0"] <= BARS["l0_fraction"] * row["C"])
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'method':<6}{'seed':>5}{'CE unrec ci':>12}{'unmasked':>10}{'stoch':>8}{'rounded':>9}{'KL ci':>8}"
            f"{'KL adv':>9}{'L0':>8}{'L0/C':>7}{'alive':>7}{'wall s':>8}  bars")
    lines = [head]
    for r in rows:
        lines.append(f"{r['method']:<6}{r['seed']:>5}{100 * r['ci_masked_ce_unrecovered']:>11.1f}%"
                     f"{100 * r['unmasked_ce_unrecovered']:>9.2f}%{100 * r['stoch_masked_ce_unrecovered']:>7.1f}%"
                     f"{100 * r['rounded_masked_ce_unrecovered']:>8.1f}%{r['ci_masked_kl']:>8.3f}"
                     f"{r['adversarial_kl']:>9.3f}{r['l0']:>8.1f}{100 * r['l0'] / r['C']:>6.1f}%{r['alive']:>7}"
                     f"{r['wall_s']:>8.0f}  {'PASS' if r['passes'] else 'FAIL'}")
    return "\n".join(lines)


def alive_table(rows: list[dict]) -> str:
    sites = list(rows[0]["alive_per_site"])
    lines = [f"{'site':<36}" + "".join(f"{r['method']}-s{r['seed']:<5}" for r in rows)]
    for n in sites:
        lines.append(f"{n:<36}" + "".join(f"{r['alive_per_site'][n]:>4}/{r['l0_per_site'][n]:<5.1f}" for r in rows))
    return "alive / CI-L0 per site\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["spd", "vpd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (same for every method)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/lm_small"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(m, s, args.steps, args.out / f"{m}-s{s}") for s in args.seeds for m in args.methods]
    print(table(rows))
    print(alive_table(rows))
    if {"spd", "vpd"} <= set(args.methods):
        for s in args.seeds:
            spd, vpd = (next(r for r in rows if r["seed"] == s and r["method"] == m) for m in ("spd", "vpd"))
            print(f"seed {s}: adversarial KL  VPD {vpd['adversarial_kl']:.3f}  SPD {spd['adversarial_kl']:.3f}  "
                  f"{'VPD lower' if vpd['adversarial_kl'] < spd['adversarial_kl'] else 'VPD NOT lower'}")


if __name__ == "__main__":
    main()
