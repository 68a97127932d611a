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
    """Yield a temporary sibling directory; on success it gets its manifest (MARKER) and replaces `path` in one
    rename, on failure it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{str(path)!r} already exists; choose another path or pass overwrite/--force.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        write_manifest(tmp)
        _set_modes(tmp)
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


def recover_dir(path: str | Path) -> None:
    """Put back the previous version of `path` when a process was killed between atomic_dir's two renames (the old
    directory moved aside, the new one not yet in place), so that no kill ever loses both."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return
    aside = sorted(path.parent.glob(f".{path.name}.old.*/x"))
    if aside:
        os.replace(aside[-1], path)
        shutil.rmtree(aside[-1].parent, ignore_errors=True)


# -- the manifest: every file's SHA-256, checked whenever one is read back ----------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path) -> None:
    """Write MARKER into a finished directory: it marks the directory as ours and records every file's SHA-256."""
    files = {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
             if p.is_file() and not p.is_symlink() and p.name != MARKER}
    write_json(root / MARKER, {"written_by": "decomp-hooks", "note": "overwrite/--force may replace this directory; "
                               "files are checked against these SHA-256 hashes when read", "files": files})


def _manifest_of(path: Path) -> tuple[Path, dict[str, str]] | None:
    """The nearest enclosing directory with a manifest that lists `path`, and its hashes; None if none does."""
    path = path.absolute()
    for root in path.parents:
        marker = root / MARKER
        if marker.is_file():
            try:
                files = json.loads(marker.read_text()).get("files")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return None  # a marker from before manifests: nothing to check against
            rel = path.relative_to(root).as_posix()
            return (root, files) if isinstance(files, dict) and rel in files else None
    return None


_verified: dict[tuple[str, int, int], None] = {}


def verify(path: str | Path) -> None:
    """Raise StoreError naming `path` when its contents differ from the hash its directory's manifest recorded (a
    flipped bit, an edit, a truncation); files outside a manifest pass."""
    path = Path(path)
    found = _manifest_of(path)
    if found is None:
        return
    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    root, files = found
    if _sha256(path) != files[path.absolute().relative_to(root).as_posix()]:
        raise StoreError(f"{str(path)!r} does not match the SHA-256 recorded in {str(root / MARKER)!r} when it was "
                         "written: the file was changed or corrupted on disk. Restore it from a copy, or delete "
                         f"{str(root)!r} and write it again (a run resumes from an earlier checkpoint). Edited on purpose? Delete "
                         f"{MARKER} there to read its files unchecked.")
    _verified[key] = None


def _update_manifest(path: Path) -> None:
    """Record the new hash of a file rewritten inside a finished directory, so its manifest stays true."""
    found = _manifest_of(path)
    if found is not None:
        root, files = found
        files[path.absolute().relative_to(root).as_posix()] = _sha256(path)
        marker = read_json(root / MARKER)
        write_json(root / MARKER, {**marker, "files": files})


# -- single files: a temporary sibling renamed into place, with the umask's mode, never through a link ------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _set_modes(root: Path) -> None:
    """Give a directory written under temporary names the modes plain mkdir/open would have (the umask's)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary file beside `path` (created exclusively: a planted link is never followed); on success
    it gets the umask's mode and replaces `path` (a link at `path` is replaced, not followed)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if path.name != MARKER:
        _update_manifest(path)


def write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file, then rename it over `path`."""
    with replacing(Path(path)) as tmp:
        tmp.write_text(text)


def open_own(path: str | Path, flags: int) -> int:
    """os.open(path, flags), creating the file with the umask's mode and refusing a symbolic link at `path`."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        if Path(path).is_symlink():
            raise StoreError(f"{str(path)!r} is a symbolic link; decomp-hooks does not write through links. Remove "
                             "it, or choose another output directory.") from None
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append to a log file (never through a link)."""
    with os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND), "a") as f:
        f.write(text)


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
    verify(path)
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
    with replacing(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"missing file {str(path)!r}.")
    verify(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StoreError(f"{str(path)!r} is not a readable safetensors file ({err}); it is truncated or corrupt.") from None


def require_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise StoreError naming the first floating-point tensor read from `path` that holds NaN or Inf: weights like
    that would only fail later, far from their cause."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise StoreError(f"{str(path)!r}: tensor {name!r} holds NaN or Inf values; the file is corrupt or was "
                             "written by a diverged run. Use an earlier checkpoint or retrain.")


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """The shape of every tensor in a safetensors file, from its header alone (nothing is read or allocated)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"missing file {str(path)!r}.")
    verify(path)
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
