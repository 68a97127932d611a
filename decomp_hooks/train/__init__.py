"""Training: the loop (`loop`), checkpoint I/O (`checkpoint`), process settings (`runtime`), the learning-rate
schedule (`schedule`) and the checks before the first step (`preflight`)."""
from decomp_hooks.train.loop import Interrupted, StepLoss, Trainer
from decomp_hooks.train.runtime import autocast, keep_freed_memory, peak_memory_mb, set_seed, tf32
from decomp_hooks.train.schedule import lr_at

__all__ = ["Interrupted", "StepLoss", "Trainer", "autocast", "keep_freed_memory", "lr_at", "peak_memory_mb",
           "set_seed", "tf32"]
