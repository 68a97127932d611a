"""The documentation stays usable: the README is short and links every docs page, relative links (and their
#anchors) resolve, and the configuration reference matches the config dataclasses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from decomp_hooks.config_reference import config_reference, slug

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "config-reference.md"
README_LIMIT = 10_240
REGENERATE = "python -m decomp_hooks.config_reference > docs/config-reference.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", ""))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_config_reference_is_current():
    try:
        current = config_reference()
    except ImportError as err:  # e.g. the dashboard configs without the `dashboard` extra (jinja2)
        pytest.skip(f"a config dataclass cannot be imported here: {err}")
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
    assert committed == current, (
        f"docs/config-reference.md does not match the config dataclasses; regenerate it with `{REGENERATE}` "
        "(from the repository root) and commit the result.")


def test_readme_is_at_most_10_kib():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at most {README_LIMIT} (move detail to docs/)."


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)
              if not re.match(r"[a-z]+:", target)}
    missing = [str(p.relative_to(ROOT)) for p in pages() if p.resolve() not in linked]
    assert pages(), "docs/ has no pages"
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("path", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_anchors(path):
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: {broken}"


def test_readme_keeps_the_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert "HF_HUB_OFFLINE=1 python -m pytest -q" in text, "README.md must keep the test command CI runs"
    assert 'pip install "torch==2.13.0+cpu" -e ".[lm,test,dashboard]"' in text, "README.md must keep the install command"
