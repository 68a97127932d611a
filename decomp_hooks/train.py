"""One optimisation loop for every parameter-space method: schedule, AMP, clipping, logging, checkpoints, resume,
and data parallelism over torchrun ranks (DDP, or FSDP2 with `train.fsdp`).

A method supplies `loss(cm, fwd, batch, frac) -> (total, terms, ctx)`, `evaluate(cm, fwd, batch) -> dict`,
`current_p(frac)`, and `after_backward(cm)` / `after_step(cm)` (called around each optimizer step).
"""
from __future__ import annotations

import ctypes
import json
import math
import platform
import random
import resource
import signal
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from decomp_hooks import distributed, store
from decomp_hooks.component_model import ComponentModel, key
from decomp_hooks.config import DecomposeConfig, ScheduleConfig, TrainConfig
from decomp_hooks.data import DataError, check_finite, to_device
from decomp_hooks.metrics import ci_l0
from decomp_hooks.spd import faithfulness


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, base: float, sched: ScheduleConfig) -> float:
    """Linear warmup from 0 over warmup_pct·T steps, then constant / linear / half-cosine to final_val_frac·base."""
    warmup = int(sched.warmup_pct * total)
    if step < warmup:
        return base * (step + 1) / warmup
    if sched.fn == "constant" or total <= warmup:
        return base
    t = (step - warmup) / max(total - warmup, 1)
    final = sched.final_val_frac * base
    if sched.fn == "linear":
        return base + (final - base) * t
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))


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


def vocab_size(model: torch.nn.Module) -> int | None:
    """The vocabulary size of an HF, TransformerLens or plain embedding model, if it has one."""
    for cfg_name, key in (("config", "vocab_size"), ("cfg", "d_vocab")):
        size = getattr(getattr(model, cfg_name, None), key, None)
        if isinstance(size, int):
            return size
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, torch.Tensor):
        return f"{batch.dtype} tensor of shape {list(batch.shape)} on {batch.device}"
    return type(batch).__name__


@torch.no_grad()
def preflight(model: torch.nn.Module, batch: Any) -> None:
    """Before any training: token ids within the vocabulary, and one plain forward that the batch passes."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    vocab = vocab_size(model)
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and vocab is not None and ids.numel():
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise DataError(f"token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has "
                            f"{vocab} entries; tokenize with the model's own tokenizer.")
    try:
        model(**batch) if isinstance(batch, dict) else model(batch)
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise DataError(f"the model cannot run on the data: a batch is a {describe(batch)} and the model raised "
                        f"{type(err).__name__}: {err}") from None


def _ci_params(cm: ComponentModel, name: str) -> list[torch.nn.Parameter]:
    return list(cm.ci_fns[key(name)].parameters()) if key(name) in cm.ci_fns else []


class Interrupted(RuntimeError):
    """The run received SIGTERM/SIGINT and stopped after writing a checkpoint."""


class StepLoss(nn.Module):
    """A method's loss as one module call, so DDP and FSDP2 see every parameter use of a step in a single forward
    (the losses run several target forwards and read V, U and the CI functions directly)."""

    def __init__(self, cm: ComponentModel, method: Any, fwd: Callable):
        super().__init__()
        self.cm, self.method = cm, method
        self.__dict__["fwd"] = fwd  # usually `cm` itself: kept out of the module tree so it is not registered twice

    def forward(self, batch: Any, frac: float) -> tuple[torch.Tensor, dict, Any]:
        return self.method.loss(self.cm, self.fwd, batch, frac)


class Trainer:
    """Runs a method's loss over batches from `source`, writing metrics and checkpoints under `out_dir`."""

    def __init__(self, cm: ComponentModel, method: Any, source: Any, cfg: DecomposeConfig, device: torch.device,
                 out_dir: Path | None = None, evaluate: Callable[[int], dict] | None = None, progress: bool = True,
                 fwd: Callable | None = None, rank: int = 0, world_size: int = 1):
        self.cm, self.method, self.source, self.cfg, self.device = cm, method, source, cfg, device
        self.fwd = fwd or cm
        self.out_dir, self.extra_eval, self.progress = out_dir, evaluate, progress
        self.rank, self.world_size = rank, world_size
        self.step_loss: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.step = 0
        self.records: list[dict] = []
        self.preflight_done = False
        self.fingerprints = cm.fingerprints() if out_dir is not None else {}  # before FSDP2 shards the target

    def ready(self) -> None:
        """Wrap the step for the ranks (DDP, or FSDP2 with `train.fsdp`) and build the optimizer, once; after the
        faithfulness warmup, since FSDP2 shards the parameters the warmup fits."""
        if self.opt is not None:
            return
        step = StepLoss(self.cm, self.method, self.fwd)
        if self.cfg.train.fsdp and self.world_size > 1:
            step = distributed.fully_shard_step(step, self.cm)
        elif self.world_size > 1:
            step = distributed.wrap_ddp(step, self.device)
        self.step_loss = step
        self.opt = torch.optim.AdamW([
            {"params": self.cm.component_parameters(), "name": "components"},
            {"params": self.cm.ci_parameters(), "name": "ci_fns"},
        ], lr=self.cfg.train.lr, weight_decay=0.0)

    # -- checkpoints -----------------------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": distributed.full(v).detach() for k, v in self.cm.named_parameters() if v.requires_grad}

    def rng_state(self) -> tuple[dict[str, torch.Tensor], Any]:
        """This process's RNG state, or with several ranks every rank's, under keys `rank<r>.rng.*`."""
        tensors, meta = store.rng_state()
        if self.world_size == 1:
            return tensors, meta
        states = distributed.gather_objects((tensors, meta))
        return {f"rank{r}.{k}": v for r, (t, _) in enumerate(states) for k, v in t.items()}, [m for _, m in states]

    def set_rng_state(self, tensors: dict[str, torch.Tensor], meta: Any, world_size: int) -> None:
        if world_size != self.world_size:
            raise store.StoreError(f"the checkpoint was written by a {world_size}-process run and this run has "
                                   f"{self.world_size}; resume with the same number of processes (--nproc {world_size}).")
        if self.world_size == 1:
            store.set_rng_state(tensors, meta)
            return
        prefix = f"rank{self.rank}."
        store.set_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta[self.rank])

    def ensure_out_dir(self) -> None:
        """Create the run directory with its config on the first write, so a run refused up front leaves nothing."""
        if self.out_dir is not None and self.rank == 0 and not (self.out_dir / "config.yaml").exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            store.write_text(self.out_dir / "config.yaml", self.cfg.to_yaml())

    def save_checkpoint(self) -> Path | None:
        """Every rank contributes (RNG states, FSDP2 shards); rank 0 alone writes."""
        if self.checkpoint_root is None:
            return None
        tensors = self.trainable_state()
        opt_t, opt_meta = store.optimizer_state(self.opt)
        opt_t = {k: distributed.full(v) for k, v in opt_t.items()}
        rng_t, rng_meta = self.rng_state()
        if self.rank != 0:
            return None
        self.ensure_out_dir()
        path = self.checkpoint_root / f"step-{self.step:08d}"
        with store.atomic_dir(path, overwrite=True) as tmp:
            store.write_tensors(tmp / "state.safetensors", {**tensors, **opt_t, **rng_t})
            store.write_json(tmp / "state.json", {"step": self.step, "optimizer": opt_meta, "rng": rng_meta,
                                                  "world_size": self.world_size, "fingerprints": self.fingerprints,
                                                  "data": self.source.state_dict(), "config": self.cfg.to_dict()})
        for old in sorted(self.checkpoint_root.glob("step-*"))[:-self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        tensors = store.read_tensors(path / "state.safetensors")
        meta = store.read_json(path / "state.json")
        if "fingerprints" in meta:  # absent from checkpoints written before they were recorded
            store.check_fingerprints(self.fingerprints, meta["fingerprints"],
                                     f"the run in {str(path.parent.parent)!r} was fitting",
                                     "resume with the same model and weights (a retrained target must match bit for "
                                     "bit: same seed, device and thread count), or start a new out_dir.")
        self.set_rng_state(tensors, meta["rng"], meta.get("world_size", 1))
        params = dict(self.cm.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                if name.startswith("model."):
                    if name[6:] not in params:
                        raise store.StoreError(f"checkpoint {str(path)!r} holds {name[6:]!r}, which this model lacks.")
                    params[name[6:]].copy_(value)
        self.ready()
        store.load_optimizer_state(self.opt, tensors, meta["optimizer"])
        distributed.shard_optimizer_state(self.opt)
        self.source.load_state_dict(meta["data"])
        self.step = meta["step"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint we resume from, so metrics.jsonl has no duplicate steps."""
        path = self.out_dir / "metrics.jsonl" if self.out_dir else None
        if path is None or not path.exists():
            return
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.records = [r for r in kept if r.get("step", 0) < self.step]
        if self.rank == 0:  # rank 0 alone writes (all ranks keep the records)
            store.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    # -- the loop --------------------------------------------------------------------------------------------

    def faithfulness_warmup(self) -> None:
        """Before training, fit U, V to the target weights alone with a separate AdamW (SPD main's warmup)."""
        t = self.cfg.train
        if t.faithfulness_warmup_steps <= 0:
            return
        opt = torch.optim.AdamW(self.cm.component_parameters(), lr=t.faithfulness_warmup_lr,
                                weight_decay=t.faithfulness_warmup_weight_decay)
        for _ in range(t.faithfulness_warmup_steps):
            loss = faithfulness(self.cm, {n: self.cm.component(n).delta_weight() for n in self.cm.site_names})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        distributed.broadcast_parameters(self.cm.component_parameters())  # no float drift between ranks

    def log(self, record: dict) -> None:
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        self.records.append(record)
        if self.out_dir is not None and self.rank == 0:  # records are reduced over ranks before they get here
            self.ensure_out_dir()
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def grad_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (if configured) and return the gradient norms of the component and CI parameter groups."""
        t = self.cfg.train
        norms = []
        for params, clip in ((self.cm.component_parameters(), t.grad_clip_components), (self.cm.ci_parameters(), t.grad_clip_ci_fns)):
            grads = [p for p in params if p.grad is not None]
            if not grads:
                norms.append(torch.zeros((), device=self.device))
            elif clip is not None:
                norms.append(distributed.full(torch.nn.utils.clip_grad_norm_(grads, clip)))
            else:
                norms.append(torch.linalg.vector_norm(torch.stack([distributed.full(n) for n in torch._foreach_norm([p.grad for p in grads])])))
        return norms[0], norms[1]

    def train(self) -> list[dict]:
        cfg, t = self.cfg, self.cfg.train
        keep_freed_memory(self.device, t)
        if self.step == 0:
            self.faithfulness_warmup()
            set_seed(cfg.seed * self.world_size + self.rank)  # masks differ per rank (methods.md §1.7 Seeds)
        self.ready()
        bar = tqdm(total=t.steps + 1, initial=self.step, disable=not self.progress or self.rank != 0, desc="decompose")
        step_times: list[float] = []
        with stop_on_signal() as flag:
            while self.step <= t.steps:
                begin = time.perf_counter()
                last = self.step == t.steps
                if not last:
                    terms, ctx = self.train_step()
                    step_times.append(time.perf_counter() - begin)
                    if self.step % t.log_every == 0:
                        self.log_train(terms, ctx, step_times)
                if self.step % t.eval_every == 0 or last:
                    self.log(self.evaluate())
                self.step += 1
                bar.update(1)
                if self.step % t.checkpoint_every == 0 or self.step > t.steps:
                    self.save_checkpoint()
                if distributed.any_rank(flag["signal"] is not None):
                    self.save_checkpoint()
                    bar.close()
                    raise Interrupted(f"stopped by signal {flag['signal'] or 'on another rank'} at step {self.step}; "
                                      f"resume from {self.out_dir}")
        bar.close()
        return self.records

    def train_step(self) -> tuple[dict[str, torch.Tensor], Any]:
        t = self.cfg.train
        lr = lr_at(self.step, t.steps, t.lr, t.schedule)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch = to_device(self.source.next(), self.device)
        check_finite(batch, self.step)
        if not self.preflight_done:
            preflight(self.cm.target, batch)
            self.preflight_done = True
        with tf32(self.device, t):
            with autocast(self.device, t):
                try:
                    total, terms, ctx = self.step_loss(batch, self.step / max(t.steps, 1))
                except FloatingPointError as err:
                    raise FloatingPointError(f"step {self.step}: {err}; the last good checkpoint is kept in {self.checkpoint_root}") from None
            self.opt.zero_grad(set_to_none=True)
            total.backward()
        self.method.after_backward(self.cm)
        g_comp, g_ci = self.grad_norms()
        if not (torch.isfinite(g_comp) and torch.isfinite(g_ci)):
            bad = [n for n in self.cm.site_names if any(p.grad is not None and not torch.isfinite(p.grad).all()
                                                        for p in (*self.cm.component(n).parameters(), *_ci_params(self.cm, n)))]
            raise FloatingPointError(f"step {self.step}: non-finite gradient at sites {bad} (components {g_comp.item()}, CI functions "
                                     f"{g_ci.item()}); the last good checkpoint is kept in {self.checkpoint_root}")
        self.opt.step()
        self.method.after_step(self.cm)
        terms = {**terms, "total": total.detach(), "lr": lr, "grad_norm/components": g_comp, "grad_norm/ci_fns": g_ci}
        return terms, ctx

    def log_train(self, terms: dict, ctx: Any, step_times: list[float]) -> None:
        tau = self.cfg.ci_alive_threshold
        l0 = {f"train/l0/{n}": ci_l0(c.lower.detach(), tau) for n, c in ctx.ci.items()}
        recent = step_times[-self.cfg.train.log_every:]
        record = {"step": self.step, **{f"train/{k}": v for k, v in terms.items()}, **l0,
                  "train/l0/total": sum(l0.values()),
                  "time_per_step_s": sum(recent) / len(recent), "steps_per_s": len(recent) / sum(recent),
                  "peak_memory_mb": peak_memory_mb(self.device)}
        p = self.method.current_p(self.step / max(self.cfg.train.steps, 1))
        if p is not None:
            record["train/importance_p"] = p
        self.log(distributed.mean_over_ranks(record))

    def evaluate(self) -> dict:
        """The method's metrics on this rank's share of a batch, averaged over ranks; `extra_eval` on rank 0 only."""
        batch = to_device(self.source.next(), self.device)
        with distributed.gathered(self.step_loss):
            with torch.no_grad(), autocast(self.device, self.cfg.train):
                metrics = self.method.evaluate(self.cm, self.fwd, batch)
            record = distributed.mean_over_ranks({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
            if self.extra_eval is not None and self.rank == 0:
                record.update({f"eval/{k}": v for k, v in self.extra_eval(self.step).items()})
        return record
