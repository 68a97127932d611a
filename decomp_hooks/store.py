"""Saving and loading: safetensors + JSON only, every file and directory written atomically, never unpickled."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class StoreError(ValueError):
    """A saved file or directory that is missing, truncated or not one of ours."""


#: the file `atomic_dir` puts in every directory it writes: only such a directory is ever replaced by overwrite/--force
MARKER = ".decomp-hooks"


def replaceable_dir(path: str | Path, overwrite: bool, error: type[Exception] = StoreError,
                    inputs: tuple[str | Path | None, ...] = ()) -> bool:
    """Check an output directory before writing it whole; returns the `overwrite` flag for `atomic_dir` (True for an
    existing empty one, or, when `overwrite`, a non-empty one that decomp-hooks wrote). Never one that is or holds
    one of the `inputs` of the command. Raises `error` naming the fix otherwise."""
    path = Path(path)
    for source in (Path(s).resolve() for s in inputs if s is not None):
        if source == path.resolve() or path.resolve() in source.parents:
            raise error(f"{str(path)!r} is (or holds) {str(source)!r}, which this command reads; choose another "
                        "output directory.")
    if not path.exists():
        return False
    if not path.is_dir():
        raise error(f"{str(path)!r} exists and is not a directory; choose another output path.")
    if any(path.iterdir()):
        if not overwrite:
            raise error(f"{str(path)!r} already exists and is not empty; choose another output directory or pass "
                        "overwrite=True (--force) to replace it.")
        if not (path / MARKER).is_file():
            raise error(f"{str(path)!r} holds files decomp-hooks did not write (it has no {MARKER} marker), so "
                        "overwrite/--force will not delete it; remove it yourself or choose another output directory.")
    return True


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename, on failure it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise StoreError(f"{str(path)!r} already exists; choose another path or pass overwrite/--force.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("written by decomp-hooks; overwrite/--force may replace this directory\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"missing file {str(path)!r}.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{str(path)!r} is not valid JSON ({err}); the file is truncated or was edited.") from None


def read_records(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics file; a torn line (a writer killed mid-line) is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"missing file {str(path)!r}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StoreError(f"{str(path)!r} is not a readable safetensors file ({err}); it is truncated or corrupt.") from None


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """The shape of every tensor in a safetensors file, from its header alone (nothing is read or allocated)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"missing file {str(path)!r}.")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise StoreError(f"{str(path)!r} is not a readable safetensors file ({err}); it is truncated or corrupt.") from None


class FingerprintError(ValueError):
    """The model's target weights differ from those a decomposition or checkpoint was trained on."""


def fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a weight's float32 values: tells whether a model is the one a decomposition was trained on."""
    data = weight.detach().float().contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def check_fingerprints(current: dict[str, str], saved: dict[str, str], trained_on: str, fix: str) -> None:
    """Raise FingerprintError for the first site whose weight's fingerprint differs from the saved one."""
    for name, fp in current.items():
        if saved.get(name) != fp:
            raise FingerprintError(f"site {name!r}: the model's weight differs from the one {trained_on} "
                                   f"(fingerprint {fp} vs {saved.get(name)}); {fix}")


# -- RNG and optimizer state as tensors + JSON -------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a run draws from: torch CPU/CUDA and numpy as tensors, Python's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(state), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
