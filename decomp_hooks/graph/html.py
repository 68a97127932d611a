"""The HTML view of a graph: one self-contained page (inline style and script, the graph JSON embedded, nothing
fetched), drawn from the same JSON document the viewers read. Every text reaches the page through `textContent`."""
from __future__ import annotations

import html
import json
import re
from importlib.resources import files
from typing import Any

#: characters that could end the embedding <script> element or be read as markup, as JSON string escapes
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_PLACEHOLDER = re.compile(r"__(TITLE|STYLE|SCRIPT|GRAPH_JSON)__")


def script_json(doc: dict[str, Any]) -> str:
    """`doc` as JSON that is safe inside a `<script type="application/json">` element."""
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


def render_html(doc: dict[str, Any]) -> str:
    """The page for a graph document (see `decomp_hooks.graph.document`)."""
    templates = files("decomp_hooks.graph") / "templates"
    parts = {"TITLE": html.escape(f"Attribution graph: {doc['metadata']['prompt']}"),
             "STYLE": (templates / "graph.css").read_text(encoding="utf-8"),
             "SCRIPT": (templates / "graph.js").read_text(encoding="utf-8"),
             "GRAPH_JSON": script_json(doc)}
    page = (templates / "graph.html").read_text(encoding="utf-8")
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], page)
