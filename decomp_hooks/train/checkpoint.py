"""Checkpoints of a training run: trainable parameters, optimizer state, every rank's RNG state and method state
(e.g. VPD's persistent adversarial sources, one file per rank), the data position, written atomically by rank 0
under `<out_dir>/checkpoints/step-NNNNNNNN/`; and reading one back."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from decomp_hooks import distributed, store
from decomp_hooks.component_model import ComponentModel
from decomp_hooks.config import ConfigError, DecomposeConfig, from_dict
from decomp_hooks.methods.base import Method


#: config fields (dotted paths) a resume may change: more steps, and how often to log, evaluate and checkpoint
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.threads")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted path: leaf value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class Checkpoints:
    """The checkpoint directory of one run directory, as seen by one rank (rank 0 alone writes)."""

    def __init__(self, out_dir: Path, cfg: DecomposeConfig, rank: int = 0, world_size: int = 1,
                 arithmetic: str | None = None):
        self.out_dir, self.cfg, self.rank, self.world_size = out_dir, cfg, rank, world_size
        self.arithmetic = arithmetic  # runtime.arithmetic of this process: recorded, and compared on resume
        self.root = out_dir / "checkpoints"

    def ensure_out_dir(self) -> None:
        """Create the run directory with its config on the first write, so a run refused up front leaves nothing."""
        if self.rank == 0 and not (self.out_dir / "config.yaml").exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            store.write_text(self.out_dir / "config.yaml", self.cfg.to_yaml())

    def check_resumable(self) -> None:
        """Refuse to resume with a config that differs from the run's `config.yaml` anywhere but RESUMABLE, naming
        every changed field with both values; then record the config this run continues with."""
        path = self.out_dir / "config.yaml"
        if not path.is_file():
            return
        try:
            saved = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise store.StoreError(f"{str(path)!r} is not a readable config ({err}); it was edited or damaged; start "
                                   "a new out_dir.") from None
        self.check_unchanged(saved, str(path))
        if self.rank == 0:
            store.write_text(path, self.cfg.to_yaml())

    def check_unchanged(self, saved: dict | None, where: str) -> None:
        """Refuse a config that differs from the one saved at `where` (config.yaml, or a checkpoint's state.json,
        whose hash its manifest guards) in any field but RESUMABLE."""
        if saved is None:  # checkpoints written before they held their config
            return
        try:
            saved_flat = flatten(from_dict(DecomposeConfig, saved).to_dict())
        except ConfigError as err:
            raise store.StoreError(f"{where!r} holds a config this version cannot read ({err}); it was not written "
                                   "by this version of decomp-hooks or was edited; start a new out_dir.") from None
        current = flatten(self.cfg.to_dict())
        changed = [k for k in sorted(set(saved_flat) | set(current))
                   if saved_flat.get(k) != current.get(k) and k not in RESUMABLE]
        if changed:
            shown = "; ".join(f"{k}: {saved_flat.get(k)!r} in the run, {current.get(k)!r} now" for k in changed[:8])
            raise store.StoreError(f"cannot resume {str(self.out_dir)!r} with a changed config ({shown}; from "
                                   f"{where}). Only {', '.join(RESUMABLE)} may change on resume; use the run's "
                                   "config.yaml, or start a new out_dir.")

    def check_arithmetic(self, saved: str | None, path: Path) -> None:
        """Warn when the checkpoint was computed in other arithmetic than this process will use (another CPU or
        device, same config): the run goes on, but no longer as an uninterrupted one would, bit for bit."""
        if saved is not None and self.arithmetic is not None and saved != self.arithmetic:
            warnings.warn(f"checkpoint {str(path)!r} was computed in {saved} and this process computes in "
                          f"{self.arithmetic} (another CPU or device); the resumed run continues, but will not repeat "
                          "an uninterrupted run bit for bit. Resume on the kind of machine that wrote it for that.",
                          stacklevel=3)

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

    def stage_method_state(self, step: int, state: dict[str, torch.Tensor]) -> Path | None:
        """With several ranks, every rank writes its own method state (e.g. VPD's sources, which grow with the
        batch) to `rank<r>.method.safetensors` in a staging folder that rank 0 moves into the checkpoint: nothing of
        it travels between processes. None with one process (the state goes into `state.safetensors`) or no state."""
        if self.world_size == 1 or not state:
            return None
        staging = self.root / f".method-step-{step:08d}"
        staging.mkdir(parents=True, exist_ok=True)
        store.write_tensors(staging / f"rank{self.rank}.method.safetensors", state)
        distributed.barrier()
        return staging

    def set_method_state(self, method: Method, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Restore this rank's method state: `method.*` in the state file, or this rank's own file."""
        if self.world_size == 1:
            method.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("method.")})
            return
        own, prefix = path / f"rank{self.rank}.method.safetensors", f"rank{self.rank}.method."
        legacy = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # written before files
        method.load_state_dict(store.read_tensors(own) if own.is_file() else legacy)

    def save(self, step: int, cm: ComponentModel, opt: torch.optim.Optimizer, data_state: dict,
             fingerprints: dict[str, str], method: Method) -> Path | None:
        """Every rank contributes (RNG states, the method's state, FSDP2 shards); rank 0 alone writes. Keeps the
        newest `train.keep_checkpoints`."""
        tensors = {f"model.{k}": distributed.full(v).detach() for k, v in cm.named_parameters() if v.requires_grad}
        opt_t, opt_meta = store.optimizer_state(opt)
        opt_t = {k: distributed.full(v) for k, v in opt_t.items()}
        rng_t, rng_meta = self.rng_state()
        state = {k: v.detach().cpu() for k, v in method.state_dict().items()}
        staging = self.stage_method_state(step, state)
        if self.rank != 0:
            return None
        self.ensure_out_dir()
        path = self.root / f"step-{step:08d}"
        method_t = {f"method.{k}": v for k, v in state.items()} if self.world_size == 1 else {}
        with store.atomic_dir(path, overwrite=True) as tmp:
            store.write_tensors(tmp / "state.safetensors", {**tensors, **opt_t, **rng_t, **method_t})
            for f in sorted(staging.iterdir()) if staging is not None else []:
                shutil.move(f, tmp / f.name)
            store.write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_meta,
                                                  "world_size": self.world_size, "fingerprints": fingerprints,
                                                  "data": data_state, "config": self.cfg.to_dict(),
                                                  "arithmetic": self.arithmetic})
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for old in sorted(self.root.glob("step-*"))[:-self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def latest(self) -> Path:
        found = sorted(self.root.glob("step-*"))
        if not found:
            raise store.StoreError(f"no checkpoint to resume in {str(self.out_dir)!r} (expected {str(self.root)}/step-*).")
        return found[-1]

    def load(self, path: Path, cm: ComponentModel, fingerprints: dict[str, str],
             method: Method) -> tuple[dict[str, torch.Tensor], dict]:
        """Check the model, restore RNG state, parameters and the method's state; returns the tensors and metadata
        for the rest (the optimizer state, the data position and the step)."""
        tensors = store.read_tensors(path / "state.safetensors")
        meta = store.read_json(path / "state.json")
        if "fingerprints" in meta:  # absent from checkpoints written before they were recorded
            store.check_fingerprints(fingerprints, meta["fingerprints"],
                                     f"the run in {str(path.parent.parent)!r} was fitting",
                                     "resume with the same model and weights (a retrained target must match bit for "
                                     "bit: same seed, device and thread count), or start a new out_dir.")
        store.require_finite({k: v for k, v in tensors.items() if k.startswith("model.")}, path / "state.safetensors")
        self.check_unchanged(meta.get("config"), str(path / "state.json"))
        self.check_arithmetic(meta.get("arithmetic"), path)
        self.set_rng_state(tensors, meta["rng"], meta.get("world_size", 1))
        self.set_method_state(method, tensors, path)
        params = dict(cm.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                if name.startswith("model."):
                    if name[6:] not in params:
                        raise store.StoreError(f"checkpoint {str(path)!r} holds {name[6:]!r}, which this model lacks.")
                    params[name[6:]].copy_(value)
        return tensors, meta

    def truncate_metrics(self, step: int) -> list[dict]:
        """Drop log lines written after the checkpoint we resume from, so metrics.jsonl has no duplicate steps;
        returns the records kept."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return []
        records = [r for r in store.read_records(path) if r.get("step", 0) < step]
        if self.rank == 0:  # rank 0 alone writes (all ranks keep the records)
            store.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return records
