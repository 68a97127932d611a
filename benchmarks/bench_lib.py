"""Wall time and peak memory of the LIB basis (M′) + edges: vmapped VJPs vs one backward per output direction.

Cases: the modular-addition transformer (3 node layers + output, last position from ln2) and a tiny transformer
(16 positions, every position an output) at two widths. The naive implementation, written here for comparison,
loops in Python over output directions (t, i) with one `torch.autograd.grad` each; both give the same M′ and E
(checked). Wall time is the best of `--repeat` runs. Peak memory: `torch.cuda.max_memory_allocated` on CUDA, else
the peak RSS above the start (sampled).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_lib.py
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import torch

from decomp_hooks.lib import build
from decomp_hooks.lib.basis import F64, LayerBasis, with_constant
from decomp_hooks.lib.config import LIBConfig, load_lib_config
from decomp_hooks.lib.nodes import NodeLayers
from decomp_hooks.toy.modadd import ModAddConfig, ModAddTransformer, modadd_dataset


def naive_jacobian_gram(nodes: NodeLayers, layer: int, data: list, c_next: torch.Tensor, *_) -> torch.Tensor:
    """M′ with one backward per output direction (t, i) per batch."""
    d = sum(nodes.widths[layer])
    acc, rows = torch.zeros(d + 1, d + 1, dtype=F64, device=c_next.device), 0
    for batch in data:
        with torch.no_grad():
            (x,) = nodes.read(batch, [layer])
        x = x.detach().requires_grad_()
        out = with_constant(nodes.run_from(layer, batch, x)) @ c_next.to(x.dtype)
        for t in range(out.shape[1]):
            for i in range(out.shape[2]):
                (g,) = torch.autograd.grad(out[:, t, i].sum(), x, retain_graph=True)
                g = g.reshape(-1, d).to(F64)
                acc[:d, :d] += g.T @ g
        rows += x.shape[0] * x.shape[1]
    return acc / rows


def naive_edges(nodes: NodeLayers, layer: int, data: list, lower: LayerBasis, upper: LayerBasis, *_) -> torch.Tensor:
    """Squared gradient-rule edges with one backward per output direction (t, i) per batch."""
    d = sum(nodes.widths[layer])
    acc, rows = torch.zeros(upper.C.shape[1], lower.C.shape[1], dtype=F64, device=upper.C.device), 0
    for batch in data:
        with torch.no_grad():
            (x,) = nodes.read(batch, [layer])
        c_in, cp_in, c_out = (t.to(x.dtype) for t in (lower.C, lower.C_pinv, upper.C))
        y = (with_constant(x) @ c_in).detach().requires_grad_()
        out = with_constant(nodes.run_from(layer, batch, (y @ cp_in)[..., :d])) @ c_out
        for t in range(out.shape[1]):
            for i in range(out.shape[2]):
                (g,) = torch.autograd.grad(out[:, t, i].sum(), y, retain_graph=True)
                acc[i] += (g * y).detach().sum(1).to(F64).pow(2).sum(0)
        rows += x.shape[0] * x.shape[1]
    return acc / rows


def lib_pipeline(model: torch.nn.Module, data: list, cfg: LIBConfig, naive: bool) -> list[torch.Tensor]:
    """The library's build (Grams, bases backwards, edges) with the vmapped or the naive Jacobians; returns every
    layer's Λ and every edge matrix."""
    nodes = NodeLayers(model, cfg.layers, cfg.last_position_from)
    fns = {"gram_fn": naive_jacobian_gram, "edge_fn": naive_edges} if naive else {}
    res = build.build_graph(nodes, data, data, cfg, next(model.parameters()).device, **fns)
    return [res.eigenvalues[n] for n in res.layers] + res.edges


class PeakRSS:
    """Peak resident memory above the start, sampled every 2 ms in a thread (CPU runs)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def measure(fn: Callable[[], list[torch.Tensor]], device: torch.device) -> tuple[float, float, list[torch.Tensor]]:
    """Seconds, peak MiB and the outputs of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20, out
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return seconds, (mem.peak - mem.start) / 2**20, out


def cases(device: torch.device, n_modadd: int, n_tiny: int) -> dict:
    """(model, batches, config) per case; untrained weights (cost does not depend on training)."""
    torch.manual_seed(0)
    tokens = modadd_dataset()[0][:n_modadd].to(device)
    out = {"modadd p=113 (N=%d)" % n_modadd: (
        ModAddTransformer().to(device).double(), [tokens],
        load_lib_config(None, layers=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
                                      "output"], last_position_from="blocks.0.hook_resid_mid"))}
    for width in (32, 64):
        cfg = ModAddConfig(p=99, d_model=width, n_heads=4, d_head=width // 4, d_mlp=4 * width, n_ctx=16)
        seqs = torch.randint(0, 100, (n_tiny, 16), device=device)
        out[f"tiny transformer d={width}, 16 pos (N={n_tiny})"] = (
            ModAddTransformer(cfg).to(device).double(), [seqs],
            load_lib_config(None, layers=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"],
                            rotate_final=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-modadd", type=int, default=256)
    parser.add_argument("--n-tiny", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation; the fastest is reported")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, float64 model, basis (M′) + edges")
    print(f"{'case':42s} {'impl':8s} {'wall s':>8s} {'peak MiB':>9s} {'speed-up':>8s}  max rel diff")
    for name, (model, data, cfg) in cases(device, args.n_modadd, args.n_tiny).items():
        results = {}
        for impl in ("naive", "vmap"):  # warm-up: torch.func's first call pays one-off setup costs (~5 s on CPU)
            lib_pipeline(model, [d[:2] for d in data], cfg, impl == "naive")
        for impl in ("naive", "vmap"):  # best of --repeat runs: the machine may be shared
            runs = [measure(lambda: lib_pipeline(model, data, cfg, impl == "naive"), device) for _ in range(args.repeat)]
            results[impl] = (min(r[0] for r in runs), max(r[1] for r in runs), runs[0][2])
        (tn, mn, on), (tv, mv, ov) = results["naive"], results["vmap"]
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() for a, b in zip(ov, on))
        print(f"{name:42s} {'naive':8s} {tn:8.2f} {mn:9.1f}")
        print(f"{name:42s} {'vmap':8s} {tv:8.2f} {mv:9.1f} {tn / tv:7.1f}×  {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
