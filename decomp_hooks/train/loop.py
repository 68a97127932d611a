"""One optimisation loop for every method: schedule, AMP, clipping, logging, evaluation, checkpoints, resume, and
data parallelism over torchrun ranks (DDP, or FSDP2 with `train.fsdp`).

The method (a `decomp_hooks.methods.Method`) supplies the loss of a step, its evaluation and the hooks around the
optimizer step; this loop knows nothing else about it.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decomp_hooks import distributed, store
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.config import DecomposeConfig, micro_batches
from decomp_hooks.data import check_finite, split_rows, to_device
from decomp_hooks.methods.base import Method, StepOutput
from decomp_hooks.metrics import ci_l0
from decomp_hooks.progress import duration, progress_bar
from decomp_hooks.train.checkpoint import Checkpoints
from decomp_hooks.train.held_out import HeldOut
from decomp_hooks.train.preflight import preflight
from decomp_hooks.train.runtime import (arithmetic, autocast, keep_freed_memory, peak_memory_mb, positions,
                                        restore_threads, run_threads, set_seed, stop_on_signal, tf32)
from decomp_hooks.train.schedule import lr_at


class Interrupted(RuntimeError):
    """The run received SIGTERM/SIGINT and stopped after writing a checkpoint; `signum` is the signal (None when
    another rank received it)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class StepLoss(nn.Module):
    """A method's loss as one module call, so DDP and FSDP2 see every parameter use of a step in a single forward
    (the losses run several target forwards and read V, U and the CI functions directly)."""

    def __init__(self, cm: ComponentModel, method: Method):
        super().__init__()
        self.cm, self.method = cm, method

    def forward(self, batch: Any, frac: float) -> StepOutput:
        return self.method.loss(self.cm, batch, frac)


#: training steps timed before a long run states how long it will take, and what counts as long (seconds)
TIMED_STEPS, LONG_RUN_S = 10, 60


def expected_duration(step_times: list[float], steps_left: int) -> str | None:
    """The expected remaining time of a long run from its first steps (the first, which compiles and warms up, left
    out; evaluations not counted); None for a short one."""
    seconds = statistics.median(step_times[1:]) * steps_left
    if seconds < LONG_RUN_S:
        return None
    return (f"decompose: the first {len(step_times)} steps took {sum(step_times):.1f} s; the {steps_left:,} left "
            f"take about {duration(seconds)} (without evaluations)")


class Trainer:
    """Runs a method's loss over batches from `source`, writing metrics and checkpoints under `out_dir`."""

    def __init__(self, cm: ComponentModel, method: Method, source: Any, cfg: DecomposeConfig, device: torch.device,
                 out_dir: Path | None = None, evaluate: Callable[[int], dict] | None = None, progress: bool = True,
                 rank: int = 0, world_size: int = 1, held_out: HeldOut | None = None):
        self.cm, self.method, self.source, self.cfg, self.device = cm, method, source, cfg, device
        self.held_out = held_out
        self.out_dir, self.extra_eval, self.progress = out_dir, evaluate, progress
        self.rank, self.world_size = rank, world_size
        self.checkpoints = (Checkpoints(out_dir, cfg, rank, world_size, arithmetic(device, cfg.train))
                            if out_dir is not None else None)
        self.step_loss: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.step = 0
        self.records: list[dict] = []
        self.preflight_done = False
        self.fingerprints = cm.fingerprints() if out_dir is not None else {}  # before FSDP2 shards the target
        self.micro_batches = micro_batches(cfg.train, world_size)
        self.threads: int | None = None  # the run's CPU torch threads, chosen at the first step of train()

    def ready(self) -> None:
        """Wrap the step for the ranks (DDP, or FSDP2 with `train.fsdp`) and build the optimizer, once; after the
        faithfulness warmup, since FSDP2 shards the parameters the warmup fits."""
        if self.opt is not None:
            return
        step = StepLoss(self.cm, self.method)
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
        return self.checkpoints.root if self.checkpoints is not None else None

    def checkpoint_note(self) -> str:
        """Where a failed run can be resumed from, or that it cannot."""
        root = self.checkpoint_root
        if root is not None and root.is_dir() and any(root.glob("step-*")):
            return f"the last good checkpoint is kept in {root}"
        return "no checkpoint had been written yet, so nothing is kept"

    def save_checkpoint(self) -> Path | None:
        if self.checkpoints is None:
            return None
        return self.checkpoints.save(self.step, self.cm, self.opt, self.source.state_dict(), self.fingerprints,
                                     self.method)

    def start_fresh(self) -> None:
        """Drop the log lines of an earlier run in this directory that was killed before its first checkpoint."""
        self.records = self.checkpoints.truncate_metrics(0)

    def resume(self) -> None:
        """Continue from the run directory's latest checkpoint, bit for bit (refused when the config changed beyond
        the fields a resume may change)."""
        self.checkpoints.check_resumable()
        tensors, meta = self.checkpoints.load(self.checkpoints.latest(), self.cm, self.fingerprints, self.method)
        self.ready()
        store.load_optimizer_state(self.opt, tensors, meta["optimizer"])
        distributed.shard_optimizer_state(self.opt)
        self.source.load_state_dict(meta["data"])
        self.step = meta["step"]
        self.records = self.checkpoints.truncate_metrics(self.step)

    # -- the loop --------------------------------------------------------------------------------------------

    def faithfulness_warmup(self) -> None:
        """Before training, fit U, V to the target weights alone with a separate AdamW."""
        t = self.cfg.train
        if t.faithfulness_warmup_steps <= 0:
            return
        opt = torch.optim.AdamW(self.cm.component_parameters(), lr=t.faithfulness_warmup_lr,
                                weight_decay=t.faithfulness_warmup_weight_decay)
        for _ in range(t.faithfulness_warmup_steps):
            loss = self.cm.faithfulness()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        distributed.broadcast_parameters(self.cm.component_parameters())  # no float drift between ranks

    def log(self, record: dict) -> None:
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        self.records.append(record)
        if self.checkpoints is not None and self.rank == 0:  # records are reduced over ranks before they get here
            self.checkpoints.ensure_out_dir()
            store.append_text(self.out_dir / "metrics.jsonl", json.dumps(record) + "\n")

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
        """Train to `train.steps`, on CPU threads chosen at the first step (`use_threads`); the caller's thread count
        is restored afterwards."""
        self.threads = None
        with restore_threads():
            return self.loop()

    def use_threads(self, batch: Any) -> None:
        """Set the run's CPU threads (`runtime.run_threads`; logged with every training record) for the work of one
        micro-batch of `batch`, before the first forward compiles anything (compiled code is per thread count)."""
        self.threads = run_threads(self.cm, self.device, self.cfg.train, positions(batch) // self.micro_batches)
        torch.set_num_threads(self.threads)

    def loop(self) -> list[dict]:
        """The faithfulness warmup (on a fresh run), then steps with logging, evaluation and checkpoints."""
        cfg, t = self.cfg, self.cfg.train
        keep_freed_memory(self.device, t)
        if self.step == 0:
            self.faithfulness_warmup()
            set_seed(cfg.seed * self.world_size + self.rank)  # masks differ per rank
        self.ready()
        talk = self.progress and self.rank == 0
        bar = progress_bar(total=t.steps, initial=self.step, disable=not talk, desc="decompose")
        if talk:
            bar.write(self.plan())
        step_times: list[float] = []
        with stop_on_signal() as flag:
            while self.step < t.steps:
                begin = time.perf_counter()
                terms, log = self.train_step()
                step_times.append(time.perf_counter() - begin)
                if self.step % t.log_every == 0:
                    self.log_train(terms, log, step_times)
                if self.step % t.eval_every == 0:
                    self.log(self.evaluate())
                self.step += 1
                bar.update(1)
                if talk and len(step_times) == TIMED_STEPS and (note := expected_duration(step_times, t.steps - self.step)):
                    bar.write(note)
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
                if distributed.any_rank(flag["signal"] is not None):
                    self.save_checkpoint()
                    bar.close()
                    where = (f"resume from {self.out_dir}" if self.out_dir is not None else
                             "nothing was saved (pass out_dir to keep checkpoints)")
                    raise Interrupted(f"stopped by signal {flag['signal'] or 'on another rank'} at step {self.step}; {where}",
                                      flag["signal"])
            self.log(self.evaluate())  # the final evaluation, after the last checkpoint so a resume repeats it exactly
        bar.close()
        return self.records

    def plan(self) -> str:
        """What the run is about to do, in one line: method, sites, C, steps, batch, device, where it writes."""
        t = self.cfg.train
        total_c = sum(c.C for c in self.cm.components.values())
        where = f"; writing {self.out_dir}" if self.out_dir is not None else ""
        return (f"decompose: {self.cfg.method} on {len(self.cm.site_names)} matrices ({total_c:,} components), "
                f"{t.steps - self.step:,} steps of {t.batch_size} rows, on {self.device}{where}")

    def train_step(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One optimizer step over the global batch, computed in micro-batches whose gradients accumulate; returns
        the mean of each loss term, and the loop's own figures (lr, gradient norms, the method's log, CI-L0 per
        site on logging steps)."""
        t = self.cfg.train
        lr = lr_at(self.step, t.steps, t.lr, t.schedule)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch = to_device(self.source.next(), self.device)
        check_finite(batch, self.step)
        if self.threads is None:
            self.use_threads(batch)
        if not self.preflight_done:
            preflight(self.cm.target, batch)
            self.preflight_done = True
        chunks = split_rows(batch, self.micro_batches)
        self.opt.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        l0: dict[str, float] = {}
        logging = self.step % t.log_every == 0
        for i, chunk in enumerate(chunks):
            out = self.micro_step(chunk, sync=i == len(chunks) - 1, scale=1 / len(chunks))
            for k, v in {"total": out.total.detach(), **out.terms}.items():
                terms[k] = terms.get(k, 0) + v / len(chunks)
            if logging:
                for n, g in out.importances.items():
                    l0[n] = l0.get(n, 0.0) + ci_l0(g, self.cfg.ci_alive_threshold) / len(chunks)
        self.method.after_backward(self.cm)
        g_comp, g_ci = self.grad_norms()
        if not (torch.isfinite(g_comp) and torch.isfinite(g_ci)):
            bad = [n for n in self.cm.site_names if any(p.grad is not None and not torch.isfinite(p.grad).all()
                                                        for p in self.cm.site_parameters(n))]
            raise FloatingPointError(f"step {self.step}: non-finite gradient at sites {bad} (components {g_comp.item()}, CI functions "
                                     f"{g_ci.item()}); {self.checkpoint_note()}")
        self.opt.step()
        self.method.after_step(self.cm)
        return terms, {"lr": lr, "grad_norm/components": g_comp, "grad_norm/ci_fns": g_ci, "l0": l0, **out.log}

    def micro_step(self, batch: Any, sync: bool, scale: float) -> StepOutput:
        """Forward and backward of one micro-batch, its loss scaled by `scale`; gradients are reduced over the ranks
        only when `sync` (the last micro-batch of a step)."""
        t = self.cfg.train
        with distributed.gradient_sync(self.step_loss, sync), tf32(self.device, t):
            with autocast(self.device, t):
                try:
                    out = self.step_loss(batch, self.step / max(t.steps, 1))
                except FloatingPointError as err:
                    raise FloatingPointError(f"step {self.step}: {err}; {self.checkpoint_note()}") from None
            (out.total * scale if scale != 1 else out.total).backward()
        return out

    def log_train(self, terms: dict[str, torch.Tensor], log: dict[str, Any], step_times: list[float]) -> None:
        l0 = {f"train/l0/{n}": v for n, v in log.pop("l0").items()}
        recent = step_times[-self.cfg.train.log_every:]
        record = {"step": self.step, **{f"train/{k}": v for k, v in {**terms, **log}.items()}, **l0,
                  "train/l0/total": sum(l0.values()),
                  "time_per_step_s": sum(recent) / len(recent), "steps_per_s": len(recent) / sum(recent),
                  "threads": self.threads, "peak_memory_mb": peak_memory_mb(self.device)}
        self.log(distributed.mean_over_ranks(record, keep=("step", "threads")))

    def evaluate(self) -> dict:
        """The method's metrics on the held-out data if there is any, else on this rank's share of the next training
        batch; averaged over ranks; `extra_eval` on rank 0 only."""
        with distributed.gathered(self.step_loss):
            with torch.no_grad(), autocast(self.device, self.cfg.train):
                if self.held_out is not None:
                    metrics = self.held_out(self.cm, self.method, self.device)
                else:
                    metrics = self.method.evaluate(self.cm, to_device(self.source.next(), self.device))
            record = distributed.mean_over_ranks({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
            if self.extra_eval is not None and self.rank == 0:
                record.update({f"eval/{k}": v for k, v in self.extra_eval(self.step).items()})
        return record
