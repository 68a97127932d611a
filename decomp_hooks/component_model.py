"""The target model with its sites' components and CI functions: forwards with chosen site masks.

One `forward(x, masks=..., cache=...)` serves every method: hooks installed for the call read each site's input and,
for sites with a mask, replace the output with `SiteComponents.forward`. A masked site that runs before any other
masked site sees the target's own input, so it may reuse that input's `x V` from the target pass (`reuse`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from decomp_hooks import store
from decomp_hooks.causal_importance import SIGMOIDS, LeakyHardPair, make_ci_fn
from decomp_hooks.components import SiteComponents, SiteMask
from decomp_hooks.config import CIConfig, DecomposeConfig
from decomp_hooks.global_ci import GLOBAL_CI_FUNCTIONS
from decomp_hooks.methods.registry import get_method
from decomp_hooks.model_call import call_model, output_tensor
from decomp_hooks.sites import Site, SiteError, SiteKind


@dataclass
class CausalImportance:
    """One site's importances: `lower` (g, for masks) and `upper` (g⁺, for the importance loss), both `[..., C]`."""

    lower: torch.Tensor
    upper: torch.Tensor
    inner: torch.Tensor | None = None  # the component activations x V at the same input, for reuse in masked forwards


def key(name: str) -> str:
    """Site names contain dots, which ModuleDict keys may not."""
    return name.replace(".", "-")


class ComponentModel(nn.Module):
    """A frozen target model plus components and CI functions for each site.

    `ci=None` (methods without CI functions, e.g. APD): `ci_fns` is empty and `causal_importances` refuses.
    `group_size[site]` > 1: consecutive columns of that site's V (rows of U) form one higher-rank component.
    """

    def __init__(self, target: nn.Module, sites: list[Site], C: dict[str, int], ci: CIConfig | None,
                 tied: list[list[str]] | None = None, init: str = "kaiming", group_size: dict[str, int] | None = None):
        super().__init__()
        self.target = target.requires_grad_(False)
        self.sites = {s.name: s for s in sites}
        self.ci_config = ci
        tied_of = _tied_sources(tied or [], self.sites, C)
        self.components = nn.ModuleDict()
        for s in sites:
            source = self.components[key(tied_of[s.name])] if s.name in tied_of else None
            g = (group_size or {}).get(s.name, 1)
            self.components[key(s.name)] = SiteComponents(s, C[s.name], init, tied_to=source, group_size=g)
        self.ci_fns = nn.ModuleDict(_ci_fns(ci, sites, C))
        self.lower_sigmoid, self.upper_sigmoid = SIGMOIDS[ci.sigmoid] if ci is not None else (None, None)
        self.sigmoid_pair: LeakyHardPair | None = None  # both sigmoids fused, after compile_ci_fns()

    @classmethod
    def from_config(cls, target: nn.Module, sites: list[Site], C: dict[str, int], cfg: DecomposeConfig) -> "ComponentModel":
        """The component model a config's method trains, laid out on the sites as the method says."""
        layout = get_method(cfg.method).layout(sites, C, cfg)
        return cls(target, sites, layout.C, layout.ci, cfg.tied, cfg.init, group_size=layout.group_size)

    def compile_ci_fns(self) -> None:
        """torch.compile each CI function in place (their elementwise hidden layers dominate a step), and the pair of
        `leaky_hard` sigmoids as one kernel each way."""
        for fn in self.ci_fns.values():
            fn.compile()
        if self.ci_config is not None and self.ci_config.sigmoid == "leaky_hard":
            self.sigmoid_pair = LeakyHardPair()

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    def fingerprints(self) -> dict[str, str]:
        """Each site's target-weight fingerprint: tells later whether a model is the one the components were fit to."""
        return {n: store.fingerprint(s.weight()) for n, s in self.sites.items()}

    def component(self, name: str) -> SiteComponents:
        return self.components[key(name)]

    def component_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.components.parameters() if p.requires_grad]

    def ci_parameters(self) -> list[nn.Parameter]:
        return list(self.ci_fns.parameters())

    def site_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of one site: its components and its CI function, if any."""
        ci = list(self.ci_fns[key(name)].parameters()) if key(name) in self.ci_fns else []
        return [*self.component(name).parameters(), *ci]

    def faithfulness(self, delta_ws: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Σ_l ‖W_l − (V_l U_l)ᵀ‖²_F / Σ_l numel(W_l) over the sites, from their ΔW (computed if not given)."""
        if delta_ws is None:
            delta_ws = {n: self.component(n).delta_weight() for n in self.site_names}
        sq = sum(dw.float().pow(2).sum() for dw in delta_ws.values())
        return sq / sum(dw.numel() for dw in delta_ws.values())

    @contextmanager
    def _hooks(self, masks: dict[str, SiteMask], inputs: dict[str, torch.Tensor] | None,
               delta_ws: dict[str, torch.Tensor] | None, outputs: dict[str, torch.Tensor] | None,
               reuse: dict[str, torch.Tensor] | None, calls: dict[str, int] | None) -> Iterator[None]:
        state = _Pass(calls if calls is not None else {})
        handles = []
        for name, site in self.sites.items():
            if name not in masks and inputs is None:
                continue
            handles.append(site.hook(self._site_fn(name, masks.get(name), inputs, delta_ws, outputs, reuse, state)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _site_fn(self, name, mask, inputs, delta_ws, outputs, reuse, state):
        comps = self.component(name)

        def fn(x: torch.Tensor, target_out: torch.Tensor) -> torch.Tensor | None:
            first_call = name not in state.calls
            state.calls[name] = state.calls.get(name, 0) + 1
            if inputs is not None:
                inputs[name] = x
            if mask is None:
                if outputs is not None:
                    outputs[name] = target_out
                return None
            inner = reuse.get(name) if reuse and first_call and not state.masked_ran else None
            state.masked_ran = True
            dw = delta_ws.get(name) if delta_ws else None
            out = comps(x, mask, target_out=target_out, delta_w=dw, inner=inner).to(target_out.dtype)
            if outputs is not None:
                outputs[name] = out
            return out
        return fn

    def forward(self, x: Any, masks: dict[str, SiteMask] | None = None, cache: bool = False,
                delta_ws: dict[str, torch.Tensor] | None = None, outputs: dict[str, torch.Tensor] | None = None,
                reuse: dict[str, torch.Tensor] | None = None,
                calls: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the target with the given site masks (others untouched); returns (output tensor, site inputs if cached).

        `outputs`, if given, is filled with every site's output in this forward (masked or target); `calls` with how
        often each hooked site ran. `reuse[site]`: `x V` of the site's input in a target pass of the same batch, used
        by a masked site on its first call if no masked site ran before it (its input is then the target's)."""
        inputs: dict[str, torch.Tensor] | None = {} if cache or outputs is not None else None
        with self._hooks(masks or {}, inputs, delta_ws, outputs, reuse, calls):
            out = call_model(self.target, x)
        return output_tensor(out), inputs or {}

    def causal_importances(self, inputs: dict[str, torch.Tensor], noise: bool = False,
                           keep_inner: bool = False) -> dict[str, CausalImportance]:
        """CI per site from the target's site inputs; `noise` adds the binomial-sampling perturbation of z.

        `.inner` holds `x V` where the CI function read it, and for every site with `keep_inner` (for reuse)."""
        if not self.ci_fns:
            raise ValueError("this decomposition has no causal-importance functions (its method selects components "
                             "another way); ask the method: Decomposition.causal_importance(batch).")
        xs = {n: x if self.component(n).kind.reads_tokens else x.to(self.component(n).V.dtype) for n, x in inputs.items()}
        if GLOBAL_CI in self.ci_fns:  # one function for every site at once
            zs = self.ci_fns[GLOBAL_CI](xs)
            return {n: CausalImportance(*self._sigmoids(zs[n], noise), self.component(n).inner_acts(x) if keep_inner else None)
                    for n, x in xs.items()}
        out = {}
        for name, x in xs.items():
            comps, fn = self.component(name), self.ci_fns[key(name)]
            inner = comps.inner_acts(x) if fn.takes_inner_acts or keep_inner else None
            out[name] = CausalImportance(*self._importances(fn, x, inner, noise), inner)
        return out

    def _importances(self, fn: nn.Module, x: torch.Tensor, inner: torch.Tensor | None,
                     noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, g⁺) of one site: fused kernels where compiled (leaky-hard sigmoids, no binomial noise), else z and then
        the two sigmoids."""
        if self.sigmoid_pair is not None and not (noise and self.ci_config.sampling == "binomial"):
            fused = getattr(fn, "leaky_hard_importances", None)
            pair = fused(inner) if fused is not None else None
            if pair is not None:
                return pair
        return self._sigmoids(fn(inner) if fn.takes_inner_acts else fn(x), noise)

    def _sigmoids(self, z: torch.Tensor, noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, g⁺) from raw importances z: the fused pair where compiled, else each sigmoid, the lower one of a
        binomially perturbed z when sampling is binomial and `noise` is on."""
        binomial = noise and self.ci_config.sampling == "binomial"
        if self.sigmoid_pair is not None and not binomial:
            return self.sigmoid_pair(z)
        lower_z = 1.05 * z - 0.05 * torch.rand_like(z) if binomial else z
        return self.lower_sigmoid(lower_z), self.upper_sigmoid(z)


@dataclass
class _Pass:
    """One forward's bookkeeping: how often each hooked site has run, and whether a masked site has run yet."""

    calls: dict[str, int]
    masked_ran: bool = False


#: the `ci_fns` key of a global CI function (not a site key: those never start with "_")
GLOBAL_CI = "_global"


def _ci_fns(ci: CIConfig | None, sites: list[Site], C: dict[str, int]) -> dict[str, nn.Module]:
    """The CI functions a config asks for: none, one per site, or one global function over every site."""
    if ci is None:
        return {}
    if ci.type in GLOBAL_CI_FUNCTIONS:
        tokens = [s.name for s in sites if SiteKind(s.kind).reads_tokens]
        if tokens:
            raise SiteError(f"ci.type={ci.type!r} reads every site's input as a vector, but {tokens} read token ids; "
                            "leave embeddings out of the targets or use a per-site ci.type such as 'mlp'.")
        return {GLOBAL_CI: GLOBAL_CI_FUNCTIONS[ci.type](ci, {s.name: s.d_in for s in sites}, {s.name: C[s.name] for s in sites})}
    return {key(s.name): make_ci_fn(ci.type, s.kind, s.d_in, C[s.name], ci.hidden) for s in sites}


def _tied_sources(tied: list[list[str]], sites: dict[str, Site], C: dict[str, int]) -> dict[str, str]:
    """Map each tied site to its source: `[source, tied]` pairs whose weights are transposes of each other."""
    result = {}
    for pair in tied:
        if len(pair) != 2 or any(p not in sites for p in pair):
            raise SiteError(f"tied={pair!r}: each entry is [source_site, tied_site], both decomposed sites; sites are {list(sites)}.")
        src, dst = pair
        a, b = sites[src], sites[dst]
        if (a.d_in, a.d_out) != (b.d_out, b.d_in) or C[src] != C[dst]:
            raise SiteError(f"tied sites {src!r} and {dst!r} need transposed shapes and equal C.")
        if not torch.allclose(a.weight(), b.weight().T):
            raise SiteError(f"tied sites {src!r} and {dst!r}: the target weights are not transposes of each other.")
        result[dst] = src
    return result
