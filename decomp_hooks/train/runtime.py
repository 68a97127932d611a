"""Process-level settings of a training run: seeds, bf16 autocast, TF32, the CPU heap, peak memory and signals."""
from __future__ import annotations

import ctypes
import platform
import random
import resource
import signal
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from decomp_hooks.config import TrainConfig


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(device: torch.device, train: TrainConfig):
    """bf16 autocast (parameters stay fp32) where the config enables it for this device type; else a no-op."""
    if (device.type == "cuda" and train.autocast_bf16) or (device.type == "cpu" and train.autocast_bf16_cpu):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


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
