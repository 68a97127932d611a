"""Decompositions of the ground-truth toys over several seeds: the success bars (docs/toys.md#success-bars), pass
rate, the adversarial (PGD) reconstruction, CI-L0 and time per step; several configs side by side.

    python benchmarks/bench_toys.py tms_5-2 --seeds 10 --workers 2
    python benchmarks/bench_toys.py resid_mlp1 --seeds 1
    python benchmarks/bench_toys.py tms_40-10-id --device cuda --fp32 --seeds 3 --workers 3
    python benchmarks/bench_toys.py tms_5-2 vpd_tms_5-2 --seeds 10 --workers 2
    python benchmarks/bench_toys.py --report runs/a/tms_40-10.jsonl runs/b/vpd_tms_40-10.jsonl

Each seed trains its own target (toy seed = seed, so every config of one seed sees the same target), keeps it in
`<out>/<config>-s<seed>/target` (a rerun or `--resume` reloads it, so a run continued on a machine whose BLAS would
train other bits decomposes the same weights) and decomposes it with that seed; workers run seeds in parallel, one
torch thread each. Results go to one JSON-lines file per config and a table on stdout; with several configs, a last
table sets them side by side per seed, and with two it says on which seeds the second has the lower PGD-probe
reconstruction at no higher CI-L0 (VPD against SPD), as each run's final evaluation (one batch) measured them;
`reeval_toys.py` compares the saved decompositions on many shared batches. `--report` prints the same tables from
JSON-lines files already written (seeds gathered over several runs; a seed's last line counts). SIGTERM or Ctrl-C
stops every running seed at a checkpoint and starts no further one; the same command with `--resume` continues them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.synchronize
import signal
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch


_stop: multiprocessing.synchronize.Event | None = None  # in a worker: the parent's "start no further seed" event


def init_worker(stop: multiprocessing.synchronize.Event) -> None:
    """Signals reach a worker only through a run's own handler (checkpoint, then stop); between runs, `stop` says it."""
    global _stop
    _stop = stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def stopped() -> bool:
    """In a worker: whether the parent has asked to start no further seed."""
    return _stop is not None and _stop.is_set()


def seed_target(toy: str, seed: int, steps: int | None, device: str, saved: Path) -> torch.nn.Module:
    """The seed's target, reloaded from `saved` where an earlier run of this seed left it, else trained and saved
    there: a run resumed on another machine, whose BLAS trains other bits, decomposes the very same weights."""
    from decomp_hooks import store
    from decomp_hooks.toy import load_toy, make_toy, save_toy

    if (saved / "toy.json").is_file():
        meta = store.read_json(saved / "toy.json")
        if (meta.get("preset"), meta.get("seed"), meta.get("steps")) != (toy, seed, steps):
            raise SystemExit(f"{saved} holds the target {meta.get('preset')} (seed {meta.get('seed')}, steps "
                             f"{meta.get('steps')}), not {toy} (seed {seed}, steps {steps}); pass another --out.")
        return load_toy(saved, device)
    model, _ = make_toy(toy, seed=seed, steps=steps, device=device, progress=False)
    save_toy(model, saved, preset=toy, seed=seed, steps=steps)
    return model


def run_seed(config: str, seed: int, steps: int | None, device: str, out_root: str, threads: int, fp32: bool,
             resume: bool = False) -> dict | None:
    if stopped():  # neither train this seed's target nor decompose it
        return None
    torch.set_num_threads(threads)
    import decomp_hooks as dh
    from decomp_hooks.toy import toy_sampler
    from decomp_hooks.toy.evaluate import passes, toy_metrics, toy_plots

    cfg = dh.load_config(config)
    if fp32:
        cfg.train.autocast_bf16, cfg.train.tf32 = False, False
    out = Path(out_root) / f"{Path(config).stem}-s{seed}"
    start = time.perf_counter()
    model = seed_target(cfg.target.toy, seed, cfg.target.steps, device, out / "target")
    target_s = time.perf_counter() - start
    if stopped():  # while the target trained
        return None
    dec = dh.decompose(model, toy_sampler(model, device), config=cfg, steps=steps, seed=seed, device=device,
                       out_dir=out, resume=resume and (out / "checkpoints").exists(), progress=False)
    record = toy_metrics(dec)
    toy_plots(dec, out)
    step_times = [r["time_per_step_s"] for r in dec.metrics if "time_per_step_s" in r]
    final = {k.removeprefix("eval/"): v for k, v in dec.final_metrics().items()}
    return {"config": Path(config).stem, "seed": seed, "pass": passes(record, dec), **record,
            "unmasked_recon": final.get("unmasked_recon"), "stochastic_recon": final.get("stochastic_recon"),
            "pgd_probe": final.get("pgd_probe"), "ci_l0": sum(v for k, v in final.items() if k.startswith("l0/")),
            **{k: v for k, v in final.items() if k.startswith("l0/")},
            "median_step_ms": 1000 * statistics.median(step_times) if step_times else None,
            "target_train_s": target_s, "decompose_s": dec.provenance["wall_time_s"], "threads": threads, "device": device,
            "autocast_bf16": dec.provenance["autocast_bf16"]}


def stop_on_signal(stop: multiprocessing.synchronize.Event) -> None:
    """On SIGTERM/SIGINT: tell the workers to start no further seed and pass the signal on, so that each running seed
    checkpoints and stops (`--resume` continues it) and no worker outlives this process."""
    def handler(signum: int, frame: object) -> None:
        stop.set()
        for child in multiprocessing.active_children():
            child.terminate()
        raise SystemExit(f"stopped by signal {signum}; checkpoints are in the run directories, continue with --resume")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="one or more toy configs, run on the same seeds (with --report: their .jsonl results)")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds, 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--workers", type=int, default=1, help="seeds run in parallel")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--fp32", action="store_true", help="on CUDA: no bf16 autocast, no TF32 (the CPU runs' arithmetic)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each seed's run in --out from its last checkpoint (written on SIGTERM too)")
    parser.add_argument("--report", action="store_true", help="run nothing: print the tables of these results files")
    args = parser.parse_args()
    if args.report:
        report(args.configs)
        return
    threads = args.threads or max(1, (torch.get_num_threads()) // args.workers)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stop = multiprocessing.Event()
    stop_on_signal(stop)
    results: dict[str, list[dict]] = {config: [] for config in args.configs}
    files = {config: open(Path(args.out) / f"{Path(config).stem}.jsonl", "a") for config in args.configs}
    with ProcessPoolExecutor(args.workers, initializer=init_worker, initargs=(stop,)) as pool:
        futures = {pool.submit(run_seed, config, s, args.steps, args.device, args.out, threads, args.fp32,
                               args.resume): config
                   for s in seeds for config in args.configs}
        for future in as_completed(futures):  # each seed's line is kept as soon as it finishes
            if (record := future.result()) is None:  # stopped before it began
                continue
            config = futures[future]
            results[config].append(record)
            files[config].write(json.dumps(record) + "\n")
            files[config].flush()
    for f in files.values():
        f.close()
    for config, records in results.items():
        if records:
            print_config(config, sorted(records, key=lambda r: r["seed"]), threads, args.device, args.out)
    if len(args.configs) > 1:
        print_side_by_side(results)


def report(paths: list[str]) -> None:
    """The tables of `main` from results files: per file, the last line of each seed."""
    results = {}
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--report: {path} is not a file; pass the .jsonl results that a run wrote under --out")
        last = {r["seed"]: r for r in map(json.loads, Path(path).read_text().splitlines())}
        results[path] = sorted(last.values(), key=lambda r: r["seed"])
        print_config(path, results[path], results[path][0]["threads"], results[path][0]["device"], str(Path(path).parent))
    if len(paths) > 1:
        print_side_by_side(results)


def print_config(config: str, results: list[dict], threads: int, device: str, out: str) -> None:
    """Every metric of every seed of one config, and its pass count."""
    keys = [k for k in results[0] if k not in ("config", "device", "threads", "target_train_s", "autocast_bf16")]
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    n_pass = sum(r["pass"] for r in results)
    print(f"\n{Path(config).stem}: {n_pass}/{len(results)} seeds pass the bars (docs/toys.md#success-bars); "
          f"median step {statistics.median(r['median_step_ms'] for r in results):.1f} ms "
          f"({threads} thread(s) per worker, device {device}); results in {Path(out) / Path(config).stem}.jsonl\n")


def print_side_by_side(results: dict[str, list[dict]]) -> None:
    """Per seed, each config's verdict, final PGD-probe reconstruction and total CI-L0 (same seed: same target); with
    two configs, whether the second's PGD probe is lower at no higher CI-L0, and on how many seeds."""
    names = [Path(c).stem for c in results]
    by_seed = {c: {r["seed"]: r for r in rs} for c, rs in results.items()}
    seeds = sorted(set().union(*(set(v) for v in by_seed.values())))
    pair = len(names) == 2
    print("seed | " + " | ".join(f"{n} pass, pgd_probe, CI-L0" for n in names)
          + (f" | {names[1]} PGD lower at no higher CI-L0 (PGD ratio, CI-L0 ratio)" if pair else ""))
    wins = compared = 0
    for seed in seeds:
        rows = [by_seed[c].get(seed) for c in results]
        cells = []
        for r in rows:
            pgd = "-" if r is None or r["pgd_probe"] is None else f"{r['pgd_probe']:.4g}"
            cells.append("-" if r is None else f"{r['pass']}, {pgd}, {r['ci_l0']:.3f}")
        if pair and None not in rows and rows[0]["pgd_probe"] and rows[1]["pgd_probe"] is not None:
            a, b = rows
            win = b["pgd_probe"] < a["pgd_probe"] and b["ci_l0"] <= a["ci_l0"]
            wins, compared = wins + win, compared + 1
            cells.append(f"{'yes' if win else 'no'} ({b['pgd_probe'] / a['pgd_probe']:.2f}, {b['ci_l0'] / a['ci_l0']:.2f})")
        print(f"{seed} | " + " | ".join(cells))
    if pair:
        counts = [f"{n}: {sum(r['pass'] for r in by_seed[c].values())}/{len(by_seed[c])} pass"
                  for n, c in zip(names, results)]
        print(f"\n{'; '.join(counts)}; {names[1]} has the lower PGD probe at no higher CI-L0 on {wins} of {compared} "
              f"seeds run by both")


if __name__ == "__main__":
    main()
