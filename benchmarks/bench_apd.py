"""Time per step of APD against SPD on the same toy target, plus batched vs looped gradient attributions.

    python benchmarks/bench_apd.py                          # TMS 5-2: SPD, APD (gradient / ablation / activation)
    python benchmarks/bench_apd.py --target tms_40-10       # the 40-10 configs
    python benchmarks/bench_apd.py --batch-size 2048        # both methods at one batch size
    python benchmarks/bench_apd.py --device cuda

Each case runs in its own process (peak memory is its own) on one shared target (trained once, saved to a temporary
directory), with its shipped config and evaluation switched off; the step time is the median over logged windows
after the first. The shipped configs differ in batch size (SPD TMS 4096, APD 2048): `--batch-size` equalises them.
The attribution table times one APD gradient-attribution pass: one batched vector-Jacobian call over all d_out
output directions vs the reference's Python loop of d_out backward passes (same numbers, checked).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    "tms_5-2": {"spd": "tms_5-2", "apd": "apd_tms_5-2"},
    "tms_40-10": {"spd": "tms_40-10", "apd": "apd_tms_40-10"},
}
CASES = {"spd": ("spd", None), "apd": ("apd", "gradient"), "apd-ablation": ("apd", "ablation"),
         "apd-activation": ("apd", "activation")}


def run_case(case: str, target: str, target_dir: str, steps: int, device: str, threads: int, batch_size: int | None) -> dict:
    """One case in this process: load the shared target, decompose for `steps`, report step time and memory."""
    torch.set_num_threads(threads)
    import dataclasses

    import decomp_hooks as dh
    from decomp_hooks.toy import load_toy, toy_sampler
    from decomp_hooks.train import peak_memory_mb

    method, attribution = CASES[case]
    model = load_toy(target_dir, device=device)
    cfg = dh.load_config(CONFIGS[target][method])
    window = max(steps // 10, 1)
    cfg.train = dataclasses.replace(cfg.train, threads=threads, log_every=window, eval_every=10**9, checkpoint_every=10**9,
                                    faithfulness_warmup_steps=0, compile=False,
                                    batch_size=batch_size or cfg.train.batch_size)
    if attribution is not None:
        cfg.apd = dataclasses.replace(cfg.apd, attribution_type=attribution)
    dec = dh.decompose(model, toy_sampler(model, device), config=cfg, steps=steps, device=device, progress=False)
    times = [r["time_per_step_s"] for r in dec.metrics if "time_per_step_s" in r][1:]
    ms = 1000 * statistics.median(times)
    return {"case": case, "batch": cfg.train.batch_size, "ms_per_step": ms, "steps_per_s": 1000 / ms,
            "peak_memory_mb": peak_memory_mb(torch.device(device))}


def time_attributions(target_dir: str, target: str, device: str, threads: int, batch_size: int, repeats: int = 5) -> dict:
    """Median time of one gradient-attribution pass: batched VJPs vs a loop of d_out backward passes."""
    torch.set_num_threads(threads)
    import decomp_hooks as dh
    from decomp_hooks.adapters import resolve
    from decomp_hooks.methods.apd.attributions import gradient_attributions
    from decomp_hooks.methods.apd.layout import component_outputs
    from decomp_hooks.methods.apd.method import APD
    from decomp_hooks.component_model import ComponentModel
    from decomp_hooks.toy import load_toy, toy_sampler

    model = load_toy(target_dir, device=device)
    cfg = dh.load_config(CONFIGS[target]["apd"])
    module, sites, cs = resolve(model, cfg.targets)
    cm = ComponentModel.from_config(module, sites, cs, cfg).to(device)
    APD(cfg).init_components(cm)
    x = toy_sampler(model, device)(batch_size)

    def looped() -> torch.Tensor:
        posts = {}

        def hook(name):
            def fn(inp, out):
                posts[name] = (inp.detach(), torch.zeros_like(out, requires_grad=True))
                return out + posts[name][1]
            return fn

        handles = [s.hook(hook(n)) for n, s in cm.sites.items()]
        with torch.enable_grad():
            out = model(x)
        for h in handles:
            h.remove()
        contrib = {n: component_outputs(cm.component(n), inp).detach() for n, (inp, _) in posts.items()}
        scores = 0
        for o in range(out.shape[-1]):
            grads = torch.autograd.grad(out[..., o].sum(), [p for _, p in posts.values()], retain_graph=True)
            scores = scores + sum(torch.einsum("...j,...cj->...c", g, contrib[n]) for g, n in zip(grads, posts)).pow(2)
        return scores

    def batched() -> torch.Tensor:
        return gradient_attributions(cm, x)[0]

    torch.testing.assert_close(batched(), looped(), rtol=1e-4, atol=1e-6)
    result = {}
    for name, fn in (("batched", batched), ("loop", looped)):
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        result[name] = 1000 * statistics.median(ts)
    return {"d_out": model.config.n_features, "batch": batch_size, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="tms_5-2", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=None, help="override both configs' batch size")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--attributions", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.target, args.target_dir, args.steps, args.device, args.threads, args.batch_size)))
        return
    if args.attributions:
        print(json.dumps(time_attributions(args.target_dir, args.target, args.device, args.threads, args.batch_size or 2048)))
        return

    from decomp_hooks.toy import make_toy, save_toy

    with tempfile.TemporaryDirectory() as tmp:
        target_dir = str(Path(tmp) / "target")
        model, _ = make_toy(args.target, steps=1000, device=args.device, progress=False)  # a short target: timing only
        save_toy(model, target_dir)
        common = ["--target", args.target, "--target-dir", target_dir, "--steps", str(args.steps), "--device",
                  args.device, "--threads", str(args.threads)] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        rows = []
        for case in args.cases:
            out = subprocess.run([sys.executable, __file__, "--one", case, *common], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        out = subprocess.run([sys.executable, __file__, "--attributions", *common], capture_output=True, text=True, check=True)
        attr = json.loads(out.stdout.strip().splitlines()[-1])

    spd_ms = next((r["ms_per_step"] for r in rows if r["case"] == "spd"), None)
    print(f"{args.target}, device {args.device}, {args.threads} thread(s), {args.steps} steps per case")
    print(f"{'case':15s} {'batch':>6s} {'ms/step':>9s} {'steps/s':>8s} {'peak MiB':>9s} {'vs SPD':>7s}")
    for r in rows:
        ratio = f"{r['ms_per_step'] / spd_ms:.2f}x" if spd_ms else "-"
        print(f"{r['case']:15s} {r['batch']:6d} {r['ms_per_step']:9.2f} {r['steps_per_s']:8.1f} {r['peak_memory_mb']:9.0f} {ratio:>7s}")
    print(f"\ngradient attributions (d_out = {attr['d_out']}, batch {attr['batch']}): batched VJP {attr['batched']:.2f} ms, "
          f"loop of {attr['d_out']} backwards {attr['loop']:.2f} ms ({attr['loop'] / attr['batched']:.1f}x)")


if __name__ == "__main__":
    main()
