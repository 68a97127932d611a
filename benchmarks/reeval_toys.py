"""Finished toy decompositions of two configs re-evaluated on many fresh batches: per seed, the PGD probe and the total
CI-L0 of each with standard errors, and the paired difference (one target per seed; the same batches and the same
PGD starts for both configs).

A run's own final evaluation reads one batch (2,048 or 4,096 rows), and its CI-L0 moves from batch to batch by about
as much as VPD and SPD differ on some seeds. This loads each seed's saved decomposition from `bench_toys.py --out`
directories (`<root>/<config>-s<seed>/decomposition`, the first root that has it) onto that seed's target (the one
saved beside the first config's run, else retrained; the load refuses it if its weights differ from the ones
decomposed) and evaluates `--batches` batches.

Batches and PGD starts depend only on the seed and the batch index, so a baseline evaluated once can stand in for its
decomposition later: `--baseline-record` takes the first config's figures from an earlier `--out` file (same batches,
PGD scope and rows), and the differences are then of the means, with unpaired standard errors. Records name the
arithmetic (`bf16`: the ResidMLP configs evaluate under bf16 autocast only on CPUs with bf16 units), and a baseline
evaluated in another one is pointed out.

    python benchmarks/reeval_toys.py resid_mlp1 vpd_resid_mlp1 --runs runs/toys --seeds 10 --batches 20
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import decomp_hooks as dh

METRICS = ("pgd_probe", "ci_l0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs=2, metavar="CONFIG", help="the baseline config, then the one compared with it")
    parser.add_argument("--runs", nargs="+", default=["runs/bench"], metavar="ROOT",
                        help="bench_toys.py --out directories, searched in order for each seed's run")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds, from --first-seed")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20, help="evaluation batches per seed (each the configs' size)")
    parser.add_argument("--pgd-scope", choices=("unique_per_datapoint", "shared_across_batch"), default=None,
                        help="the PGD probe's sources: per position, or one per site for the whole batch "
                             "(default: each config's train.eval_pgd_scope)")
    parser.add_argument("--baseline-record", default=None, metavar="JSONL",
                        help="take the first config's per-seed figures from this earlier --out file instead of "
                             "re-evaluating its decomposition")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append one JSON line per seed to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    baselines = read_baselines(args.baseline_record, seeds) if args.baseline_record else {}
    records = []
    for seed in seeds:
        record = reevaluate(args.configs, seed, [Path(r) for r in args.runs], args.batches, args.pgd_scope,
                            baselines.get(seed))
        records.append(record)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print_table(args.configs, records)


def reevaluate(configs: list[str], seed: int, roots: list[Path], batches: int, pgd_scope: str | None = None,
               baseline: dict | None = None) -> dict:
    """One seed: both configs' decompositions on its target (saved beside the run, else retrained), `batches` shared
    batches each; `pgd_scope` overrides the configs' PGD-probe scope. With a `baseline` record the first config is
    read from it, not evaluated."""
    from decomp_hooks.toy import load_toy, make_toy, toy_sampler
    from decomp_hooks.train.runtime import uses_autocast

    cfgs = [dh.load_config(c) for c in configs]
    targets = {(c.target.toy, c.target.steps) for c in cfgs}
    if len(targets) != 1:
        raise SystemExit(f"{configs[0]} and {configs[1]} decompose different targets {sorted(targets)}; pair configs "
                         "of the same toy.")
    (toy, steps), = targets
    evaluated = configs[1:] if baseline is not None else configs
    runs = [find_run(Path(c).stem, seed, roots) for c in evaluated]
    saved = runs[0].parent / "target"  # bench_toys.py keeps each seed's target beside its run
    if (saved / "toy.json").is_file():
        model = load_toy(saved)
    else:
        model, _ = make_toy(toy, seed=seed, steps=steps, progress=False)
    decs = [dh.load(run, model=copy.deepcopy(model)) for run in runs]
    if pgd_scope:
        for dec in decs:
            dec.method.cfg.train.eval_pgd_scope = pgd_scope
    rows = cfgs[0].train.eval_batch_size or cfgs[0].train.batch_size
    per_batch = evaluate(decs, toy_sampler(model), batches, rows, seed)
    record: dict = {"seed": seed, "batches": batches, "rows": rows,
                    "pgd_scope": [dec.method.cfg.train.eval_pgd_scope for dec in decs],
                    "bf16": [uses_autocast(dec.device, dec.config.train) for dec in decs]}
    for c, values in zip(evaluated, per_batch):
        record[Path(c).stem] = {m: mean_se(values[m]) for m in METRICS}
    if baseline is not None:
        return with_baseline(record, baseline, Path(configs[0]).stem, Path(configs[1]).stem)
    for m in METRICS:
        record[f"{m}_difference"] = mean_se([b - a for a, b in zip(per_batch[0][m], per_batch[1][m])])
    return record


def read_baselines(path: str, seeds: range) -> dict[int, dict]:
    """An earlier `--out` file's records by seed; every seed asked for must be there."""
    with open(path) as f:
        records = {r["seed"]: r for r in map(json.loads, filter(str.strip, f))}
    if missing := [s for s in seeds if s not in records]:
        raise SystemExit(f"{path} has no record of seed(s) {missing}; drop them from --seeds or rerun the baseline.")
    return records


def with_baseline(record: dict, baseline: dict, a: str, b: str) -> dict:
    """`record` (config `b` only) completed with config `a`'s figures from an earlier record of the same batches:
    differences of the means, standard errors combined as for independent samples."""
    same = baseline["batches"] == record["batches"] and baseline["rows"] == record["rows"]
    if a not in baseline or not same or baseline["pgd_scope"][0] != record["pgd_scope"][0]:
        raise SystemExit(f"the baseline record of seed {record['seed']} is not {a} on {record['batches']} batches of "
                         f"{record['rows']} rows with {record['pgd_scope'][0]} PGD sources; rerun it or match them.")
    bf16 = baseline.get("bf16", [None])[0]  # None: recorded before records named their arithmetic
    if bf16 != record["bf16"][0]:
        arithmetic = {True: "bf16", False: "fp32", None: "unrecorded"}[bf16]
        print(f"note: seed {record['seed']}'s baseline was evaluated in {arithmetic} arithmetic, this run in "
              f"{'bf16' if record['bf16'][0] else 'fp32'} (train.autocast_bf16_cpu and this CPU's bf16 units)")
    record = {**record, a: baseline[a], "pgd_scope": [baseline["pgd_scope"][0], *record["pgd_scope"]],
              "bf16": [bf16, *record["bf16"]], "paired": False}
    for m in METRICS:
        (ma, sa), (mb, sb) = baseline[a][m], record[b][m]
        record[f"{m}_difference"] = [mb - ma, math.hypot(sa, sb)]
    return record


def find_run(stem: str, seed: int, roots: list[Path]) -> Path:
    """The saved decomposition of `stem` on `seed` in the first root that holds it."""
    for root in roots:
        if (path := root / f"{stem}-s{seed}" / "decomposition").is_dir():
            return path
    raise SystemExit(f"no {stem}-s{seed}/decomposition under {', '.join(map(str, roots))}; run bench_toys.py "
                     f"{stem} --first-seed {seed} --seeds 1 --out <root> first, or pass its --out with --runs.")


def evaluate(decs: list[dh.Decomposition], sampler: Callable[[int], torch.Tensor], batches: int, rows: int,
             seed: int) -> list[dict[str, list[float]]]:
    """Per decomposition, the PGD probe and total CI-L0 on each batch, under the config's own evaluation settings
    (autocast included); every decomposition sees the same batch and the same random PGD start."""
    from decomp_hooks.train import autocast

    out: list[dict[str, list[float]]] = [{m: [] for m in METRICS} for _ in decs]
    for b in tqdm(range(batches), desc=f"seed {seed}", leave=False):
        torch.manual_seed(1_000_003 * (seed + 1) + b)
        batch = sampler(rows)
        for dec, values in zip(decs, out):
            torch.manual_seed(7_919 * (seed + 1) + b)
            with torch.no_grad(), autocast(dec.device, dec.config.train):
                metrics = dec.method.evaluate(dec.cm, batch)
            values["pgd_probe"].append(metrics["pgd_probe"])
            values["ci_l0"].append(sum(v for k, v in metrics.items() if k.startswith("l0/")))
    return out


def mean_se(values: list[float]) -> list[float]:
    """[mean, standard error of the mean]."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return [statistics.fmean(values), se]


def print_table(configs: list[str], records: list[dict]) -> None:
    """Per seed: both configs' figures ± standard errors, the paired CI-L0 difference, and the comparison."""
    a, b = (Path(c).stem for c in configs)
    print(f"seed | {a}: PGD probe, CI-L0 | {b}: PGD probe, CI-L0 | PGD ratio | CI-L0 {b} − {a} | "
          f"{b} PGD lower at no higher CI-L0")
    wins = 0
    for r in records:
        (pa, _), (pb, _), (d, se) = r[a]["pgd_probe"], r[b]["pgd_probe"], r["ci_l0_difference"]
        win = pb < pa and d <= 0
        wins += win
        cells = [f"{cell(r[c]['pgd_probe'], '.3e')}, {cell(r[c]['ci_l0'], '.3f')}" for c in (a, b)]
        print(f"{r['seed']} | {' | '.join(cells)} | {pb / pa:.3f} | {d:+.4f} ± {se:.4f} | {'yes' if win else 'no'}")
    rows = records[0]["rows"] * records[0]["batches"] if records else 0
    print(f"\n{b} has the lower PGD probe at no higher CI-L0 on {wins} of {len(records)} seeds "
          f"({rows} rows per seed; ± one standard error over batches)")


def cell(value: list[float], fmt: str) -> str:
    """`mean ± standard error` in one format."""
    return f"{value[0]:{fmt}} ± {value[1]:{fmt}}"


if __name__ == "__main__":
    main()
