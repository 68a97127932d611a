"""Progress bars that suit where stderr goes: tqdm's defaults in a terminal or notebook, few redraws into a log."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

#: seconds between redraws when stderr is not a terminal: a day-long run writes a few thousand lines, not millions
LOG_INTERVAL_S = 30.0
#: whether tqdm.auto chose the notebook widget, which redraws in place whatever stderr is
_WIDGET = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
                 disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`); when its stream (stderr unless `file=`) is not
    a terminal it redraws at most every LOG_INTERVAL_S seconds, so a captured log gets a few lines, not one a step."""
    if not (_WIDGET or _is_tty(kwargs.get("file") or sys.stderr)):
        kwargs = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S, **kwargs}
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def duration(seconds: float) -> str:
    """A rough human time span: '3 h 20 min', '12 min' or '40 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{round(seconds / 60)} min" if seconds >= 60 else f"{round(seconds)} s"


def _is_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty (a replaced stream), or a closed one
        return False
