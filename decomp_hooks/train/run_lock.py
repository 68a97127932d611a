"""One writer per run directory: an exclusive lock (`.lock`, holding the writer's pid) for the whole run, and a run
that fails before its first checkpoint leaves nothing behind, so a retry into the same directory starts clean."""
from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from decomp_hooks.store import StoreError, open_own

LOCK = ".lock"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s lock while the block runs; a second writer is refused with the holder's pid. A directory
    this run created is removed again when the block fails before any checkpoint was written."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = os.fdopen(open_own(out_dir / LOCK, os.O_RDWR), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StoreError(f"run directory {str(out_dir)!r} is being written by another process (pid {holder}); wait "
                         "for it to finish, or choose another out_dir (CLI: --out).") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    except BaseException:
        if created and not (out_dir / "checkpoints").exists():
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth keeping: the retry starts from nothing
        raise
    finally:
        handle.close()  # releases the lock; the file stays (unlocked) with the run
