"""Harvest speed and memory on the small language model's VPD decomposition, at two token counts.

    nice -n 10 python benchmarks/bench_harvest.py                    # 50k and 100k tokens, one CPU thread
    python benchmarks/bench_harvest.py --tokens 2048 4096            # a quick check that it runs

Each token count runs in a process of its own, so that each peak resident set size is its own: it loads the run
(`runs/lm_small/vpd-s0` by default) on the model its config names (the `small_lm` asset), streams the standard
library's docstrings tokenized at the run's context length, harvests them into a temporary directory, and reports
tokens/s, the resident set size before the harvest and at its peak (`ru_maxrss`), and the bytes of the harvest's
accumulators (every tensor it writes). Memory that does not grow with the tokens shows as the same peak and the same
accumulator bytes for both counts.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    """The current resident set size of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(run: Path, n_tokens: int, batch_size: int) -> dict:
    """One harvest of `n_tokens` tokens in this process: its figures."""
    import torch

    from decomp_hooks.cli.harvest import load_run_model
    from decomp_hooks.harvest import HarvestConfig, harvest
    from decomp_hooks.text import TokenBatches, stdlib_docstrings

    torch.set_num_threads(1)
    dec, tokenizer = load_run_model(run, None, torch.device("cpu"))
    context = dec.config.data.context_length if dec.config.data is not None else 64
    data = TokenBatches(stdlib_docstrings(), tokenizer, context_length=context, batch_size=batch_size)
    before = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        h = harvest(dec, data, n_tokens, Path(tmp) / "h", HarvestConfig(batch_size=batch_size), progress=False)
    stored = sum(t.nbytes for tensors in h.files.values() for t in tensors.values())
    return {"tokens": h.tokens, "components": len(h.components), "vocab": h.meta["vocab"],
            "tokens_per_s": h.meta["tokens_per_s"], "seconds": h.meta["seconds"], "rss_before_mib": before,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "accumulator_mib": stored / 2**20, "live": int((h.count > 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "lm_small" / "vpd-s0")
    parser.add_argument("--tokens", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.run, args.tokens[0], args.batch_size)))
        return
    rows = []
    for n in args.tokens:
        done = subprocess.run([sys.executable, __file__, "--worker", "--run", str(args.run), "--tokens", str(n),
                               "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"harvest of {args.run} ({rows[0]['components']} components, vocabulary {rows[0]['vocab']}), 1 CPU thread")
    print(f"{'tokens':>8} {'tokens/s':>9} {'seconds':>8} {'RSS before':>11} {'peak RSS':>9} {'accumulators':>13} "
          f"{'live':>5}")
    for r in rows:
        print(f"{r['tokens']:>8} {r['tokens_per_s']:>9.0f} {r['seconds']:>8.1f} {r['rss_before_mib']:>8.0f} MiB "
              f"{r['peak_rss_mib']:>5.0f} MiB {r['accumulator_mib']:>9.1f} MiB {r['live']:>5}")


if __name__ == "__main__":
    main()
