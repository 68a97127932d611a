"""Fault injection for the kill -9 tests: run a CLI command in a subprocess whose writes are slowed, and SIGKILL it
at a chosen state of its output, so a test can check the output is then whole or absent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from decomp_hooks import store

SLOWED_CLI = """
import sys, time
import torch
from decomp_hooks import store
from decomp_hooks.cli import main

torch.set_num_threads(1)

def slowed(write):
    def slow(*args, **kwargs):
        write(*args, **kwargs)
        time.sleep(0.12)  # each state of the output stays long enough for the test to kill the process in it
    return slow

store.write_text, store.write_json, store.write_tensors = map(slowed, (store.write_text, store.write_json,
                                                                       store.write_tensors))
main(sys.argv[1:], prog_name="decomp-hooks")
"""


def temporary_dirs(out: Path) -> set[Path]:
    """The temporary siblings `.<out>.*` that a writer builds `out` in."""
    return set(out.parent.glob(f".{out.name}.*"))


def kill_when(args: list[str], out: Path, reached: Callable[[set[Path], Path], bool]) -> None:
    """Run `decomp-hooks ARGS` with slowed writes; SIGKILL it once `reached(its new temporary dirs, out)` holds (a
    read that races with a rename counts as not yet)."""
    before = temporary_dirs(out)

    def now() -> bool:
        try:
            return reached(temporary_dirs(out) - before, out)
        except (OSError, store.StoreError):
            return False

    proc = subprocess.Popen([sys.executable, "-c", SLOWED_CLI, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not now():
            assert proc.poll() is None, f"the command ended before the kill point: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the kill point was not reached in 60 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
