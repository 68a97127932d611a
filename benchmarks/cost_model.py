"""The floor of one decomposition step: what its arithmetic and memory traffic cost on this machine, pass by pass.

    python benchmarks/cost_model.py tms_40-10 resid_mlp1 vpd_tms_5-2 --threads 2
    python benchmarks/bench_spd.py            # prints the measured step beside this model, as a ratio

One training step (the method's loss and its backward, VPD's adversary included) runs once with every compiled
kernel forced eager, under a dispatch mode that counts, per phase (target forward, CI function, each masked forward,
the adversary's source gradients, the backward):
- GEMMs (every matmul, addmm, bmm, attention): FLOPs by torch.utils.flop_counter's formulas, and time: each distinct
  (op, shapes, dtype) of the step is run alone on fresh tensors and timed, its best run being what the BLAS can do
  on that shape on this machine;
- transcendental evaluations (erf, exp, exp2, tanh, sigmoid, log, GELU: elements of their outputs), at the rate of
  `torch.erf` on 1M cache-resident elements;
- memory traffic: the operands and results of those GEMMs (every other elementwise op is assumed fused away), at
  the bandwidth of a 64 MiB copy.
A phase's time is the roofline max(GEMM time + transcendentals / erf rate, bytes / bandwidth); the step's is their
sum: an implementation whose every GEMM ran as fast as it runs alone, whose transcendentals ran at the vector
units' rate, and which never touched memory but for its GEMMs. Rates are measured in the same process, on the same
threads; the peak GEMM rate (2048³, fp32 or bf16 as the config computes) is printed for reference.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
#: transcendental ops -> evaluations per output element
TRANSCENDENTAL = {aten.erf: 1, aten.exp: 1, aten.exp2: 1, aten.tanh: 1, aten.sigmoid: 1, aten.log: 1, aten.gelu: 1,
                  aten.gelu_backward: 2, aten.silu: 1, aten.silu_backward: 1, aten.sigmoid_backward: 0,
                  aten.tanh_backward: 0}


@dataclass
class Rates:
    """What the machine does per second on the threads and dtype of a run."""

    gemm_flops: float
    transcendentals: float
    bandwidth: float
    label: str = ""

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype = torch.float32) -> "Rates":
        a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
        x = torch.randn(2**20, device=device)
        big = torch.empty(2**24, device=device)  # 64 MiB: past any core's or GPU's L2
        out = torch.empty_like(big)
        gemm = 2 * 2048**3 / best_time(lambda: a @ b, device)
        trans = x.numel() / best_time(lambda: torch.erf(x), device)
        bw = 2 * big.numel() * 4 / best_time(lambda: out.copy_(big), device)
        label = (f"GEMM {gemm / 1e9:.0f} GFLOP/s ({str(dtype).removeprefix('torch.')}), erf {trans / 1e9:.2f} G/s, "
                 f"copy {bw / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
        return cls(gemm, trans, bw, label)


def best_time(fn, device: torch.device, repeats: int = 7) -> float:
    """The fastest of `repeats` timed calls after two warm-up calls (seconds)."""
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times[2:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Phase:
    """The counted work of one phase of a step."""

    calls: int = 0
    flops: float = 0.0
    transcendentals: float = 0.0
    bytes: float = 0.0
    gemms: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))  # GEMM key -> how often it ran
    gemm_s: float = 0.0  # their time alone, filled in by StepCount.time_gemms

    def seconds(self, rates: Rates) -> float:
        compute = self.gemm_s + self.transcendentals / rates.transcendentals
        return max(compute, self.bytes / rates.bandwidth)


@dataclass
class StepCount:
    """Every phase of one step, in the order they first ran."""

    phases: dict[str, Phase] = field(default_factory=lambda: defaultdict(Phase))

    def seconds(self, rates: Rates) -> float:
        return sum(p.seconds(rates) for p in self.phases.values())

    def time_gemms(self, device: torch.device) -> None:
        """Time every distinct GEMM of the step alone, once, and give each phase the time of its GEMMs."""
        alone = {key: best_time(_replay(key, device), device, repeats=5)
                 for key in {k for p in self.phases.values() for k in p.gemms}}
        for p in self.phases.values():
            p.gemm_s = sum(n * alone[key] for key, n in p.gemms.items())

    def table(self, rates: Rates) -> str:
        rows = [f"  {'phase':46s} {'calls':>5s} {'GFLOP':>8s} {'GEMM ms':>8s} {'transc. M':>9s} {'MB':>8s} {'model ms':>9s}"]
        for name, p in self.phases.items():
            if not p.calls:
                continue
            rows.append(f"  {name:46s} {p.calls:5d} {p.flops / 1e9:8.3f} {1000 * p.gemm_s:8.2f} {p.transcendentals / 1e6:9.1f} "
                        f"{p.bytes / 1e6:8.1f} {1000 * p.seconds(rates):9.2f}")
        rows.append(f"  {'step':46s} {'':5s} {sum(p.flops for p in self.phases.values()) / 1e9:8.3f} "
                    f"{1000 * sum(p.gemm_s for p in self.phases.values()):8.2f} "
                    f"{sum(p.transcendentals for p in self.phases.values()) / 1e6:9.1f} "
                    f"{sum(p.bytes for p in self.phases.values()) / 1e6:8.1f} {1000 * self.seconds(rates):9.2f}")
        return "\n".join(rows)


class _Counter(TorchDispatchMode):
    """Adds each op's GEMM FLOPs and operand bytes, and its transcendental evaluations, to the current phase."""

    def __init__(self, count: StepCount):
        super().__init__()
        self.count, self.phase = count, "outside the model (losses, masks)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        phase = self.count.phases[self.phase]
        if packet in flop_registry:
            phase.flops += flop_registry[packet](*args, **kwargs, out_val=out)
            tensors = [t for t in (*args, *(out if isinstance(out, (tuple, list)) else (out,)))
                       if isinstance(t, torch.Tensor)]
            phase.bytes += sum(t.numel() * t.element_size() for t in tensors)
            phase.gemms[_gemm_key(func, args, kwargs)] += 1
        elif packet in TRANSCENDENTAL and isinstance(out, torch.Tensor):
            phase.transcendentals += TRANSCENDENTAL[packet] * out.numel()
        return out


def _gemm_key(func, args: tuple, kwargs: dict) -> tuple:
    """A hashable description of one GEMM call: the op, and each argument as (shape, stride, dtype) or its value."""
    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype)
        return ("value", tuple(describe(x) for x in a) if isinstance(a, (list, tuple)) else a)
    return func, tuple(describe(a) for a in args), tuple((k, describe(v)) for k, v in sorted(kwargs.items()))


def _replay(key: tuple, device: torch.device):
    """A call of the GEMM `key` describes, on fresh random tensors of its shapes, strides and dtypes."""
    func, args, kwargs = key

    def build(d):
        if d[0] == "tensor":
            _, shape, stride, dtype = d
            extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
            base = torch.randn(extent, device=device).to(dtype) if dtype.is_floating_point else \
                torch.zeros(extent, dtype=dtype, device=device)
            return base.as_strided(shape, stride)
        return tuple(build(x) for x in d[1]) if isinstance(d[1], tuple) else d[1]
    real_args, real_kwargs = [build(a) for a in args], {k: build(v) for k, v in kwargs}
    return lambda: func(*real_args, **real_kwargs)


@contextmanager
def _phase(counter: _Counter, name: str) -> Iterator[None]:
    before, counter.phase = counter.phase, name
    counter.count.phases[name].calls += 1
    try:
        yield
    finally:
        counter.phase = before


def count_step(cm: Any, method: Any, batch: Any, frac: float = 0.5) -> StepCount:
    """Run one step's loss and backward eagerly, counting its work per phase; gradients are cleared afterwards."""
    count = StepCount()
    counter = _Counter(count)
    forward, importances, grad = cm.forward, cm.causal_importances, torch.autograd.grad

    def counted_forward(x, masks=None, **kw):
        label = "target forward" if not masks else f"masked forward ({len(masks)} of {len(cm.site_names)} sites)"
        with _phase(counter, label):
            return forward(x, masks=masks, **kw)

    def counted_importances(*a, **kw):
        with _phase(counter, "CI function forward"):
            return importances(*a, **kw)

    def counted_grad(*a, **kw):
        with _phase(counter, "adversary source gradients"):
            return grad(*a, **kw)

    cm.forward, cm.causal_importances, torch.autograd.grad = counted_forward, counted_importances, counted_grad
    try:
        with torch.compiler.set_stance("force_eager"), counter:
            out = method.loss(cm, batch, frac)
            with _phase(counter, "backward (every term, CI function included)"):
                out.total.backward()
    finally:
        del cm.forward, cm.causal_importances
        torch.autograd.grad = grad
        cm.zero_grad(set_to_none=True)
        if hasattr(method, "pending"):
            method.pending, method.micro = [], 0
    count.time_gemms(next(cm.parameters()).device)
    return count


def model_ms(dec: Any, batch: Any, rates: Rates) -> tuple[float, str]:
    """The cost model's milliseconds for one step of `dec`'s method on `batch`, and its per-phase table."""
    from decomp_hooks.train.runtime import autocast

    with autocast(batch.device if isinstance(batch, torch.Tensor) else torch.device("cpu"), dec.config.train):
        count = count_step(dec.cm, dec.method, batch)
    return 1000 * count.seconds(rates), count.table(rates)


def compute_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """The dtype a run's GEMMs use: bf16 where it runs under autocast (`uses_autocast`), else fp32."""
    from decomp_hooks.train.runtime import uses_autocast

    return torch.bfloat16 if uses_autocast(device, cfg.train) else torch.float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="shipped toy configs, e.g. tms_40-10 vpd_resid_mlp1")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import decomp_hooks as dh
    from decomp_hooks.toy import make_toy, toy_sampler

    for name in args.configs:
        cfg = dh.load_config(name)
        model, _ = make_toy(cfg.target.toy, steps=100, progress=False)
        sampler = toy_sampler(model, "cpu")
        cfg.train.faithfulness_warmup_steps, cfg.train.eval_pgd_steps, cfg.train.threads = 0, 0, args.threads
        dec = dh.decompose(model, sampler, config=cfg, steps=1, progress=False)
        rates = Rates.measure(torch.device("cpu"), compute_dtype(cfg, torch.device("cpu")))
        ms, table = model_ms(dec, sampler(cfg.train.batch_size), rates)
        print(f"{name}: cost model {ms:.2f} ms per step ({rates.label})\n{table}")


if __name__ == "__main__":
    main()
