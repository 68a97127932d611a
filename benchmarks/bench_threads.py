"""SPD step time of a toy at 1 and 2 CPU threads, on an idle machine and against a competing CPU-bound process.

    python benchmarks/bench_threads.py                                # TMS 5-2, 300 steps a configuration, 3 rounds
    python benchmarks/bench_threads.py --cases tms_5-2 resid_mlp1     # also ResidMLP 1L
    python benchmarks/bench_threads.py --steps 60 --rounds 1          # a quick check that it runs

Each case trains its toy target briefly, then runs one decomposition with the shipped config in segments of
`--steps` steps, switching between segments (from the `evaluate` callback; those evaluations, the only ones, fall
outside the timed steps) among four configurations: 1 and 2 CPU threads, each idle and while a competing process (a
Python busy loop, one core) runs. Every round runs the four in a rotated order, so drift in the machine's load
spreads over all of them, and the CI functions are compiled once per thread count and case. A timing is the median
of a segment's logged step-time windows after its first (the switch and any recompilation excluded); the table gives
the median over rounds per configuration, each round, and the ratios: 2 threads / 1 thread (idle and busy) and
busy / idle per thread count. "Idle" means no competitor of ours: other work on the machine shows in the load
average of the machine line. These figures set the thread rule `decomp_hooks.train.runtime.run_threads`
(docs/usage.md#threads-and-progress-bars).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from typing import Any

import torch
from bench_spd import machine

import decomp_hooks as dh
from decomp_hooks.toy import make_toy, toy_sampler

#: (threads, competitor running) in the order of the first round
CONFIGURATIONS = [(1, False), (2, False), (1, True), (2, True)]
#: logged step-time windows per segment; the first is dropped
WINDOWS = 6


class Switcher:
    """The `evaluate` callback that, at the start of segment k, sets configuration `order[k]`: the thread count,
    and the competing process started or stopped."""

    def __init__(self, order: list[tuple[int, bool]], segment: int):
        self.order, self.segment = order, segment
        self.competitor: subprocess.Popen | None = None

    def __call__(self, dec: Any, step: int) -> dict:
        self.stop()
        k = step // self.segment
        if k < len(self.order):
            threads, busy = self.order[k]
            torch.set_num_threads(threads)
            if busy:
                self.competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return {}

    def stop(self) -> None:
        if self.competitor is not None:
            self.competitor.kill()
            self.competitor.wait()
            self.competitor = None


def time_case(case: str, steps: int, rounds: int) -> dict[tuple[int, bool], list[float]]:
    """Per configuration, one timing (ms/step) per round, from one decomposition run in segments of `steps`."""
    window = max(steps // WINDOWS, 1)
    segment = window * WINDOWS
    order = [c for r in range(rounds) for c in CONFIGURATIONS[r % 4:] + CONFIGURATIONS[:r % 4]]
    cfg = dh.load_config(case)
    model, _ = make_toy(cfg.target.toy, steps=1000, device="cpu", progress=False)
    cfg.train.log_every, cfg.train.eval_every, cfg.train.checkpoint_every = window, segment, 10**9
    cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps = 0, 0
    switcher = Switcher(order, segment)
    torch._dynamo.config.recompile_limit = 64  # each thread count compiles anew (dynamo guards on it): keep them all
    try:
        dec = dh.decompose(model, toy_sampler(model, "cpu"), config=cfg, steps=segment * len(order) + 1,
                           device="cpu", progress=False, evaluate=switcher)
    finally:
        switcher.stop()
    windows: list[list[float]] = [[] for _ in order]
    for r in dec.metrics:
        if "time_per_step_s" in r and r["step"] >= 1 and (r["step"] - 1) % segment >= window:
            windows[(r["step"] - 1) // segment].append(1000 * r["time_per_step_s"])
    times: dict[tuple[int, bool], list[float]] = {c: [] for c in CONFIGURATIONS}
    for c, w in zip(order, windows):
        times[c].append(statistics.median(w))
    return times


def report(case: str, times: dict[tuple[int, bool], list[float]]) -> None:
    """The median ms/step of each configuration with its rounds, then the ratios between them."""
    med = {c: statistics.median(v) for c, v in times.items()}
    for (threads, busy), values in times.items():
        rounds = " ".join(f"{x:.1f}" for x in values)
        print(f"{case:12s} {threads:7d} {'busy' if busy else 'idle':5s} {med[threads, busy]:9.1f}  {rounds}")
    print(f"{case:12s} 2 threads / 1 thread: idle {med[2, False] / med[1, False]:.2f}, busy {med[2, True] / med[1, True]:.2f}; "
          f"busy / idle: 1 thread {med[1, True] / med[1, False]:.2f}, 2 threads {med[2, True] / med[2, False]:.2f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["tms_5-2"], help="shipped toy configs (e.g. resid_mlp1)")
    parser.add_argument("--steps", type=int, default=300, help="steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="timings per configuration, in rotated orders")
    args = parser.parse_args()
    print(f"machine: {machine(['cpu'])}")
    print(f"{'case':12s} {'threads':>7s} {'load':5s} {'ms/step':>9s}  rounds (ms)", flush=True)
    for case in args.cases:
        report(case, time_case(case, args.steps, args.rounds))


if __name__ == "__main__":
    main()
