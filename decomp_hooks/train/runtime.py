"""Process-level settings of a training run: seeds, bf16 autocast, TF32, the CPU heap, CPU threads, peak memory and
signals."""
from __future__ import annotations

import ctypes
import functools
import platform
import random
import resource
import signal
import warnings
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from decomp_hooks.config import TrainConfig

if TYPE_CHECKING:
    from decomp_hooks.component_model import ComponentModel


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16). Elsewhere torch emulates bf16 matmuls,
    and a ResidMLP step under autocast takes ~12× as long as in fp32 (5.5 s against 0.44 s on an AVX2 EPYC)."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                          "_is_avx512_bf16_supported"))


def uses_autocast(device: torch.device, train: TrainConfig) -> bool:
    """Whether a run on `device` computes under bf16 autocast: `train.autocast_bf16` on CUDA; on CPU
    `train.autocast_bf16_cpu` where the CPU has bf16 units, else fp32 with a warning that names the setting."""
    if device.type == "cuda":
        return train.autocast_bf16
    if device.type != "cpu" or not train.autocast_bf16_cpu:
        return False
    if cpu_has_bf16_units():
        return True
    warn_no_bf16_units()
    return False


@functools.cache
def warn_no_bf16_units() -> None:
    """Say once per process that `autocast_bf16_cpu` falls back to fp32 here, and why."""
    warnings.warn("train.autocast_bf16_cpu is true but this CPU has no bf16 matrix units (AMX or AVX512-BF16), where "
                  "torch emulates bf16 matmuls many times slower than fp32: running in fp32. Set "
                  "train.autocast_bf16_cpu: false to silence this.", stacklevel=3)


def arithmetic(device: torch.device, train: TrainConfig) -> str:
    """What a run's steps compute in on this machine (device type, bf16 autocast or fp32, TF32), as checkpoints
    record it: the same config computes differently on a CPU without bf16 units or on a GPU."""
    parts = [device.type, "bf16 autocast" if uses_autocast(device, train) else "fp32"]
    if device.type == "cuda" and train.tf32:
        parts.append("TF32")
    return ", ".join(parts)


def autocast(device: torch.device, train: TrainConfig):
    """bf16 autocast (parameters stay fp32) where `uses_autocast`; else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_autocast(device, train) else nullcontext()


@contextmanager
def tf32(device: torch.device, train: TrainConfig) -> Any:
    """TF32 matmuls and convolutions on CUDA inside the training step (where bf16 autocast already rounds harder);
    the faithfulness warmup and everything outside the loop keep full fp32."""
    if device.type != "cuda" or not train.tf32:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def keep_freed_memory(device: torch.device, train: TrainConfig) -> bool:
    """On CPU with glibc, keep freed blocks up to 32 MiB in the heap for reuse (mallopt), instead of mapping and
    unmapping every step's activations afresh: the page faults cost ~15% of a toy step. Process-wide, idempotent;
    returns whether it applied."""
    if device.type != "cpu" or not train.keep_freed_memory or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    return all([libc.mallopt(option, value) == 1 for option, value in _MALLOPT.items()])  # every option, even after a refusal


#: glibc mallopt options: M_MMAP_THRESHOLD (its maximum), M_TRIM_THRESHOLD, M_TOP_PAD
_MALLOPT = {-3: 32 * 2**20, -1: 256 * 2**20, -2: 64 * 2**20}


#: multiply-adds of one forward (`forward_work`) below which a CPU step runs on one thread: such a step is hundreds
#: of small operations, which a second thread speeds up little and slows down many times over when another process
#: holds a core; between TMS 40-10 (8.4e7) and ResidMLP 1L (6.4e8) (docs/usage.md#threads-and-progress-bars)
ONE_THREAD_WORK = 2 * 10**8


def positions(batch: Any) -> int:
    """Input vectors in a batch, the unit of a forward's work: one per token id, and one per vector along the last
    dimension of a float input (a toy's rows, embedded tokens); a dict (tuple) batch counts its `input_ids` (first
    entry)."""
    x = batch.get("input_ids", next(iter(batch.values()))) if isinstance(batch, dict) else batch
    x = x[0] if isinstance(x, (tuple, list)) and x else x
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return 1
    return x.numel() if not x.is_floating_point() or x.ndim == 1 else x.numel() // x.shape[-1]


def forward_work(cm: ComponentModel, n_positions: int) -> int:
    """Multiply-adds of one forward over `n_positions` input vectors: the target's parameters plus every site's V
    and U, per vector; the size of a step's arithmetic (a step runs a few such passes), which the thread rule uses."""
    per_position = sum(p.numel() for p in cm.target.parameters())
    per_position += sum(c.C * (c.d_in + c.d_out) for c in cm.components.values())
    return n_positions * per_position


def run_threads(cm: ComponentModel, device: torch.device, train: TrainConfig, n_positions: int) -> int:
    """CPU torch threads for a run whose forwards read `n_positions` input vectors: `train.threads` if set; else on
    CPU one thread under ONE_THREAD_WORK multiply-adds (robust when another process wants a core), else the current
    count."""
    if train.threads is not None:
        return train.threads
    if device.type == "cpu" and forward_work(cm, n_positions) < ONE_THREAD_WORK:
        return 1
    return torch.get_num_threads()


@contextmanager
def restore_threads() -> Any:
    """Give torch back the caller's CPU thread count when the block ends, whatever a run set inside it."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def stop_on_signal() -> Any:
    """Turn SIGTERM/SIGINT into a flag the loop checks, so it can checkpoint before exiting."""
    flag = {"signal": None}
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
