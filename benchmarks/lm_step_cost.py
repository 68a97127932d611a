"""The cost of one decomposition step on a language model, as a multiple of one forward + backward of the target on
the same batch, with tokens per second, peak memory and the cost model's floor of the step (benchmarks/cost_model.py)
beside it as a ratio (docs/lm.md#memory-and-speed).

    python benchmarks/lm_step_cost.py lm/small_spd lm/small_vpd
    python benchmarks/lm_step_cost.py lm/smollm2_all --layers 0 1 --c-scale 0.25 --batch-size 4 --context 64
    python benchmarks/lm_step_cost.py lm/smollm2_all --device cuda --steps 50

The target's forward + backward is timed with its weights trainable (next-token CE, the gradient of every weight),
alternating with nothing else; the decomposition step is the trainer's own `time_per_step_s`, the mean of `--steps` steps
after the first. `--layers` keeps only targets in those layers. One run at a time; set --threads on a CPU.
"""
from __future__ import annotations

import argparse
import time

import torch
from cost_model import Rates, compute_dtype, model_ms, sync


def target_step_s(model: torch.nn.Module, batch: torch.Tensor, repeats: int, device: torch.device) -> float:
    """Median seconds of one forward + backward of the target (all weights trainable) on `batch`."""
    from decomp_hooks.metrics import ce_loss
    from decomp_hooks.model_call import run_model

    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    times = []
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        ce_loss(run_model(model, batch), batch).backward()
        sync(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return sorted(times[2:])[len(times[2:]) // 2]


def measure(path: str, args: argparse.Namespace) -> dict:
    import decomp_hooks as dh
    from decomp_hooks.lm.data import token_data
    from decomp_hooks.lm.model import load_model
    from decomp_hooks.run import resolve_device

    cfg = dh.load_config(path)
    if args.layers:
        keep = "[" + "".join(str(i) for i in args.layers) + "]" if all(i < 10 for i in args.layers) else None
        if keep is None:
            raise SystemExit("--layers takes layer indices below 10")
        cfg.targets = {k.replace("layers.*.", f"layers.{keep}."): v for k, v in cfg.targets.items()}
    if args.c_scale is not None:
        cfg.c_scale = args.c_scale
    if args.context is not None:
        cfg.data.context_length = args.context
    if args.batch_size is not None:
        cfg.train.batch_size, cfg.train.micro_batch_size = args.batch_size, None
    cfg.train.steps, cfg.train.log_every = args.steps + 1, args.steps  # logged at step N: the mean of steps 1..N
    cfg.train.eval_every = cfg.train.checkpoint_every = 10**9
    cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps, cfg.data.eval_rows = 2, 0, 2  # the final evaluation is not timed
    device = resolve_device(args.device)
    loaded = load_model(cfg.model, device)
    tokens = token_data(cfg.data, loaded.tokenizer, cfg.train.batch_size, progress=False)
    batch = tokens.train[: cfg.train.batch_size].to(device)
    module = loaded.model if isinstance(loaded.model, torch.nn.Module) else loaded.model._module
    base = target_step_s(module, batch, args.repeats, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dec = dh.decompose(loaded.model, tokens.train, config=cfg, device=device, progress=False)
    steps = [r for r in dec.metrics if "time_per_step_s" in r]
    step = steps[-1]["time_per_step_s"]
    n_tokens = batch.numel()
    rates = Rates.measure(device, compute_dtype(cfg, device))
    floor_ms, table = model_ms(dec, batch, rates)
    return {"config": path, "device": str(device), "sites": len(dec.site_names),
            "C": sum(dec.cm.component(n).C for n in dec.site_names), "batch": tuple(batch.shape),
            "target_fwd_bwd_s": base, "step_s": step, "ratio": step / base, "tokens_per_s": n_tokens / step,
            "peak_memory_mb": steps[-1].get("peak_memory_mb"), "model_ms": floor_ms, "model_table": table,
            "rates": rates.label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", nargs="*", type=int, default=None)
    parser.add_argument("--c-scale", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--context", type=int, default=None, help="override data.context_length")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(path, args) for path in args.configs]
    for r in rows:
        print(f"{r['config']}: cost model {r['model_ms']:.1f} ms per step ({r['rates']})\n{r['model_table']}")
    print(f"{'config':<34}{'device':>7}{'sites':>6}{'C':>8}{'batch':>10}{'target f+b s':>13}{'step s':>9}"
          f"{'× target':>9}{'tokens/s':>10}{'peak MB':>9}{'model s':>9}{'× model':>8}")
    for r in rows:
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(f"{r['config']:<34}{r['device']:>7}{r['sites']:>6}{r['C']:>8}{'x'.join(map(str, r['batch'])):>10}"
              f"{r['target_fwd_bwd_s']:>13.4f}{r['step_s']:>9.4f}{r['ratio']:>9.1f}{r['tokens_per_s']:>10.0f}{peak:>9}"
              f"{r['model_ms'] / 1000:>9.4f}{1000 * r['step_s'] / r['model_ms']:>8.1f}")


if __name__ == "__main__":
    main()
