"""Every Python block of the README and docs runs as written: a file's blocks run in order in one namespace (later
blocks use earlier names), in a fresh interpreter in an empty folder, offline. A block that cannot run here says
why in a comment on the line before it, `<!-- not run: reason -->` (e.g. it needs a GPU)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)
#: runs the blocks from files (nnsight reads a trace's source back from its file)
DRIVER = """
import json, pathlib, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for line, code in blocks:
    path = pathlib.Path(f"block_at_line_{line}.py")
    path.write_text(code)
    try:
        exec(compile(code, str(path.resolve()), "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"the block at line {line} of {sys.argv[2]} failed")
"""


def blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, reason it is not run or None) of every Python block in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("why")) for m in BLOCK.finditer(text)]


PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(page, tmp_path):
    runnable = [(line, code) for line, code, why in blocks(page) if why is None]
    assert all(why.strip() for _, _, why in blocks(page) if why is not None), "a `not run` marker needs its reason"
    if not runnable:
        pytest.skip("every block of this page is marked `not run` (with its reason)")
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json"), str(page.relative_to(ROOT))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{page.relative_to(ROOT)}:\n{done.stderr[-4000:]}"
