"""HTML rendering: a jinja2 environment over the package's templates and matplotlib histograms inlined as PNG.

Pages are self-contained: styles are inline, pictures are `data:` URIs, and no script or font is fetched.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import jinja2

_ENV: jinja2.Environment | None = None
POS, NEG, CI = (0.84, 0.15, 0.16), (0.13, 0.40, 0.75), (0.95, 0.55, 0.10)


def environment() -> jinja2.Environment:
    """The template environment (autoescaping on; `heat` and `signed` filters colour tokens)."""
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(loader=jinja2.PackageLoader("decomp_hooks.dashboard", "templates"),
                                  autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                                  lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        _ENV.filters.update(heat=heat, signed=signed_colour, visible=visible_token)
    return _ENV


def render(template: str, **context: Any) -> str:
    """Render one template of `decomp_hooks/dashboard/templates`."""
    return environment().get_template(template).render(**context)


def _rgba(rgb: tuple[float, float, float], alpha: float) -> str:
    r, g, b = (round(255 * v) for v in rgb)
    return f"rgba({r},{g},{b},{max(0.0, min(1.0, alpha)):.2f})"


def heat(value: float) -> str:
    """Background colour for a causal importance in [0, 1]."""
    return _rgba(CI, float(value))


def signed_colour(value: float, scale: float) -> str:
    """Background colour for a signed activation relative to `scale` (red positive, blue negative)."""
    v = float(value) / scale if scale > 0 else 0.0
    return _rgba(POS if v >= 0 else NEG, abs(v))


def visible_token(token: str) -> str:
    """A token string with newlines and tabs (also byte-level BPE's `Ċ`, `ĉ`) made visible."""
    return token.replace("\n", "⏎").replace("Ċ", "⏎").replace("\t", "⇥").replace("ĉ", "⇥")


def histogram_png(centres: Sequence[float], counts: Sequence[float], width: float, xlabel: str,
                  signed: bool = False, log: bool = True) -> str:
    """A bar histogram as a `data:image/png;base64,...` URI (matplotlib, Agg backend, small figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 1.5), dpi=80)
    ax = fig.add_axes((0.14, 0.3, 0.83, 0.62))
    colours = [POS if (not signed or c >= 0) else NEG for c in centres] if signed else [CI] * len(centres)
    ax.bar(list(centres), list(counts), width=width * 0.95, color=colours)
    if log and any(c > 0 for c in counts):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=7)
    ax.tick_params(labelsize=6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
