"""The default number of components C per matrix type of a transformer, for targets given without one
(`targets: {"model.layers.*.mlp.*": null}`); docs/lm.md#components-per-matrix.

C is a multiple of the model width (the matrix's residual-stream side), after the VPD paper's 4-layer run
(d_model 768: q, k 512; v, o 1024; MLP in 3072; MLP out 3584), times the config's `c_scale`. Any other matrix gets
4 × min(d_in, d_out) (the toys' counts: TMS 5-2 has 5 features and gets 8, TMS 40-10 gets 40, ResidMLP 1L 200 for
its 100 features).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from decomp_hooks.sites import Site


@dataclass(frozen=True)
class MatrixType:
    """Site names of one matrix type (a regex searched in the name), C per model width, and which side of the
    matrix is the residual stream."""

    pattern: re.Pattern
    per_width: float
    residual: str  # "in" or "out"


#: matrix type -> its names in Llama-style HF models, GPT-2 (fused c_attn), GPT-NeoX/OPT and TransformerLens
MATRIX_TYPES: dict[str, MatrixType] = {
    "qkv": MatrixType(re.compile(r"(?:^|\.)(?:c_attn|query_key_value)$"), 8 / 3, "in"),
    "q": MatrixType(re.compile(r"(?:^|\.)(?:q_proj|W_Q)$"), 2 / 3, "in"),
    "k": MatrixType(re.compile(r"(?:^|\.)(?:k_proj|W_K)$"), 2 / 3, "in"),
    "v": MatrixType(re.compile(r"(?:^|\.)(?:v_proj|W_V)$"), 4 / 3, "in"),
    "o": MatrixType(re.compile(r"(?:^|\.)(?:o_proj|out_proj|attn\.c_proj|attention\.dense|W_O)$"), 4 / 3, "out"),
    "mlp_in": MatrixType(re.compile(r"(?:^|\.)(?:c_fc|gate_proj|up_proj|fc1|dense_h_to_4h|W_in|W_gate)$"), 4, "in"),
    "mlp_out": MatrixType(re.compile(r"(?:^|\.)(?:down_proj|mlp\.c_proj|fc2|dense_4h_to_h|W_out)$"), 14 / 3, "out"),
}


def matrix_type(name: str) -> str | None:
    """The matrix type of a site name, or None when no entry of `MATRIX_TYPES` matches it."""
    return next((kind for kind, t in MATRIX_TYPES.items() if t.pattern.search(name)), None)


#: C per min(d_in, d_out) of a matrix that is none of the table's types
OTHER_PER_WIDTH = 4


def default_c(site: Site, scale: float = 1.0) -> int:
    """C for a site: its table type's multiple of the model width, else 4 × min(d_in, d_out); times `scale` (≥ 1)."""
    kind = matrix_type(site.name)
    if kind is None:
        return max(1, round(OTHER_PER_WIDTH * min(site.d_in, site.d_out) * scale))
    t = MATRIX_TYPES[kind]
    width = site.d_in if t.residual == "in" else site.d_out
    return max(1, round(t.per_width * width * scale))


def fill_default_c(sites: list[Site], cs: dict[str, int | None], scale: float = 1.0) -> dict[str, int]:
    """C per site, the table's default where the targets gave none (null)."""
    by_name = {s.name: s for s in sites}
    return {n: c if c is not None else default_c(by_name[n], scale) for n, c in cs.items()}
