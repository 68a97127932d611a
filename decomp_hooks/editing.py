"""Model editing: rewrite or scale one component's write vector u_c (or read vector v_c), and get the edited model
where you work: a torch copy with the new weight, TransformerLens hooks, or an edit inside an nnsight trace.

Component c adds `(x·v_c) u_c` to its site's output, so replacing `(v_c, u_c)` by `(v′, u′)` changes the site's
weight, in forward orientation `[d_in, d_out]`, by the rank-one difference `v′u′ᵀ − v_c u_cᵀ`
(`W′ = W + v_c (u′ − u_c)ᵀ` for a write edit). All three forms apply exactly that change and nothing else: the other
components and the delta component stay, so scaling u_c to zero is the masked forward with component c ablated
(`docs/editing.md`).
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from decomp_hooks.sites import SiteError

#: a replacement vector, or a number that scales the current one (0.0 switches the component's write off)
NewVector = torch.Tensor | float


@dataclass(frozen=True)
class RankOne:
    """One component's read and write vectors before (`v` `[d_in]`, `u` `[d_out]`) and after (`new_v`, `new_u`)."""

    v: torch.Tensor
    u: torch.Tensor
    new_v: torch.Tensor
    new_u: torch.Tensor
    reads_tokens: bool = False

    def weight_delta(self) -> torch.Tensor:
        """The weight change in canonical orientation `[d_out, d_in]`, u′v′ᵀ − u vᵀ, computed as
        (u′ − u) v′ᵀ + u (v′ − v)ᵀ so that a write-only edit is exactly (u′ − u) vᵀ."""
        return torch.outer(self.new_u - self.u, self.new_v) + torch.outer(self.u, self.new_v - self.v)

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The change of the site's output on input `x` (`[..., d_in]`, or token ids for an embedding): with
        activations a = x·v, a′ = x·v′, it is a′(u′ − u) + (a′ − a) u."""
        a, a_new = self._acts(x, self.v), self._acts(x, self.new_v)
        return a_new.unsqueeze(-1) * (self.new_u - self.u) + (a_new - a).unsqueeze(-1) * self.u

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The edited output: the site's output `out` on `x` plus the change, in `out`'s dtype."""
        return out + self.output_delta(x).to(out.dtype)

    def _acts(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v[x] if self.reads_tokens else x.to(v.dtype) @ v


@dataclass(frozen=True)
class ComponentEdit:
    """An edit of component `component` at site `site` of a decomposition (`dec.edit(...)`), in three forms:
    `model()` (a torch copy), `fwd_hooks()` (TransformerLens) and `intervene(model)` (nnsight)."""

    dec: Any = field(repr=False)
    site: str
    component: int
    change: RankOne = field(repr=False)

    def weight_delta(self) -> torch.Tensor:
        """The change of the site's weight, canonical `[d_out, d_in]` (`W′ − W`)."""
        return self.change.weight_delta()

    def model(self) -> nn.Module:
        """A deep copy of the target module with the edited weight (the original is untouched); any toolkit runs it:
        a TransformerLens model stays one, an nnsight user wraps it again (`nnsight.NNsight(copy)`). An inserted
        identity, not a weight of the model, becomes a forward pre-hook on the copy's module."""
        site = self.dec.cm.sites[self.site]
        model = copy.deepcopy(self.dec.model)
        if site.kind.inserted:
            model.get_submodule(site.module).register_forward_pre_hook(partial(_edit_input, self.change))
        else:
            from decomp_hooks.adapters import adapter_for

            weight = site.weight().to(self.change.u) + self.weight_delta()
            adapter_for(self.dec.model).set_weight(model, site, weight)
        return model

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """TransformerLens `(hook_name, fn)` pairs for `model.run_with_hooks` that apply the edit at the site."""
        from decomp_hooks.adapters.transformer_lens import site_fwd_hooks

        return site_fwd_hooks(self.dec, {self.site: self.change.apply})

    def intervene(self, model: Any) -> None:
        """Inside `with model.trace(...)` (nnsight): apply the edit to the site's output in this forward."""
        from decomp_hooks.adapters.nnsight import replace_output

        replace_output(model, self.dec.cm.sites[self.site], self.change.apply)


def _edit_input(change: RankOne, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of an edited inserted identity: its input x becomes x + the edit's change."""
    return (change.apply(args[0], args[0]), *args[1:])


def edit(dec: Any, site: str, component: int, write: NewVector | None = None,
         read: NewVector | None = None) -> ComponentEdit:
    """An edit of one component: `write` (u_c) and `read` (v_c) are each a new vector or a number that scales the
    current one; the other stays. Bad sites, indices and vectors are refused naming the value."""
    if site not in dec.cm.sites:
        raise SiteError(f"site {site!r} is not a decomposed site; the sites are {dec.site_names}.")
    comps = dec.cm.component(site)
    c = _component_index(component, comps.C, site)
    if write is None and read is None:
        raise ValueError("nothing to edit: pass write= and/or read=, each a new vector or a number that scales the "
                         "current one (write=0.0 switches the component's write off).")
    v, u = comps.V[:, c].detach().clone(), comps.U[c].detach().clone()
    change = RankOne(v, u, _new_vector("read", read, v, site, "d_in"), _new_vector("write", write, u, site, "d_out"),
                     comps.kind.reads_tokens)
    return ComponentEdit(dec, site, c, change)


def _component_index(component: Any, C: int, site: str) -> int:
    """`component` as an index into the site's C components, refused naming it when not an integer in 0..C-1."""
    try:
        c = operator.index(component) if not isinstance(component, bool) else None
    except TypeError:
        c = None
    if c is None or not 0 <= c < C:
        raise SiteError(f"component {component!r} is out of range for site {site!r}: it has C={C} components, "
                        f"indices 0..{C - 1}.")
    return c


def _new_vector(name: str, value: NewVector | None, old: torch.Tensor, site: str, dim: str) -> torch.Tensor:
    """The edited vector: `old` (not given), `old` scaled (a number) or `value` (a finite float tensor, same shape)."""
    if value is None:
        return old
    shape = f"[{old.numel()}] (the site's {dim})"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: a factor must be a finite number.")
        return old * float(value)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} is a {type(value).__name__}; pass a tensor of shape {shape} or a number that scales "
                         "the current vector.")
    if not value.is_floating_point():
        raise ValueError(f"{name} has dtype {value.dtype}; pass a floating-point tensor (e.g. torch.float32).")
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(f"{name} has shape {list(value.shape)}; site {site!r} needs {shape}.")
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or Inf value(s); pass finite values.")
    return value.detach().to(old)
