"""SPD's loss terms, one small module each, collected into one registry: `losses[i].type` -> Term."""
from __future__ import annotations

from decomp_hooks.methods.spd.terms import faithfulness, hidden_acts, importance_minimality, pgd, reconstruction
from decomp_hooks.methods.spd.terms.base import Term

TERMS: dict[str, Term] = {
    **faithfulness.TERMS, **importance_minimality.TERMS, **reconstruction.TERMS, **pgd.TERMS, **hidden_acts.TERMS,
}

__all__ = ["TERMS", "Term"]
