"""TransformerLens 3.9 models: `HookedTransformer` (and `HookedSAETransformer`) and `TransformerBridge`.

Site names are the TL parameter names (`blocks.0.mlp.W_in`, `blocks.0.attn.W_Q`, `embed.W_E`, `unembed.W_U`, …).
Training hooks the modules with plain torch hooks; `fwd_hooks` gives the same interventions as TL `(hook_name, fn)`
pairs for `model.run_with_hooks`. The adapter also knows each site's TL hook points, the model's config, its
`ln_final` and `W_U`.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from decomp_hooks.adapters.base import Adapter, HookNames
from decomp_hooks.adapters.torch import canonical_weight_fn, set_module_weight
from decomp_hooks.components import SiteMask
from decomp_hooks.sites import Site, SiteError, SiteHook, SiteKind, match_targets

SUPPORTED = ("blocks.L.attn.W_Q/W_K/W_V/W_O, blocks.L.mlp.W_in/W_out (and W_gate in gated MLPs), embed.W_E, "
             "unembed.W_U")
_QKV = (("Q", "query_input"), ("K", "key_input"), ("V", "value_input"))
_BRIDGE_PATHS = {"attn.W_Q": "attn.q", "attn.W_K": "attn.k", "attn.W_V": "attn.v", "attn.W_O": "attn.o",
                 "mlp.W_in": "mlp.in", "mlp.W_gate": "mlp.gate", "mlp.W_out": "mlp.out"}


def _is_class(model: Any, *names: str) -> bool:
    """Whether one of `model`'s classes is a TransformerLens class with one of these names (TL need not be imported)."""
    return any(c.__name__ in names and c.__module__.startswith("transformer_lens") for c in type(model).__mro__)


@dataclass(frozen=True)
class Tap:
    """Where a site input is read: the output of module `module`, or its call argument `arg` = (name, position)."""

    module: str
    arg: tuple[str, int] | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # maps the tapped tensor to the site input


@dataclass(frozen=True)
class Route:
    """A site's input tap and the module whose output the site replaces."""

    read: Tap
    write: str


class _Handles:
    """The torch hook handles of one site, removed together."""

    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TLSite:
    """One TL weight as a site (`module` is its parameter path, the site name). `route` serves torch hooks;
    `hook_route` the TL hook points (or why there are none)."""

    def __init__(self, model: nn.Module, name: str, kind: SiteKind, weight: Callable[[], torch.Tensor],
                 bias: Callable[[], torch.Tensor | None], route: Route, hook_route: Route | str):
        self.model, self.name, self.module, self.kind = model, name, name, kind
        self._weight, self._bias = weight, bias
        self.route, self.hook_route = route, hook_route
        self.d_out, self.d_in = self.weight().shape

    def weight(self) -> torch.Tensor:
        return self._weight().detach()

    def bias(self) -> torch.Tensor | None:
        b = self._bias()
        return None if b is None else b.detach()

    def site_input(self, x: torch.Tensor) -> torch.Tensor:
        """A tapped tensor as the site input `[..., d_in]` (token ids for embeddings; per-head `hook_z` flattened)."""
        return x if self.kind.reads_tokens or x.shape[-1] == self.d_in else x.flatten(-2)

    def replace(self, fn: SiteHook, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """`fn` on the site input and the output as `[..., d_out]`; its result in the output's own layout."""
        lead = x.shape if self.kind.reads_tokens else x.shape[:-1]
        new = fn(x, out.reshape(*lead, self.d_out))
        return None if new is None else new.reshape(out.shape)

    def hook(self, fn: SiteHook) -> _Handles:
        relay, read, module = _Relay(self), self.route.read, self.model.get_submodule
        if read.arg is None:
            h_in = module(read.module).register_forward_hook(lambda m, args, out: relay.put(out, read.fn))
        else:
            h_in = module(read.module).register_forward_pre_hook(
                lambda m, args, kwargs: relay.put(_call_arg(args, kwargs, read), read.fn), with_kwargs=True)
        h_out = module(self.route.write).register_forward_hook(lambda m, args, out: self.replace(fn, relay.take(), out))
        return _Handles(h_in, h_out)


class _Relay:
    """Carries a site's input from the hook that reads it to the hook that replaces the site's output."""

    def __init__(self, site: TLSite):
        self.site, self.x = site, None

    def put(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.x = self.site.site_input(x if fn is None else fn(x))

    def take(self) -> torch.Tensor:
        if self.x is None:
            raise SiteError(f"site {self.site.name!r}: its output hook ran before its input was read; this model calls "
                            "its modules in an order the TransformerLens adapter does not support.")
        x, self.x = self.x, None
        return x


def _call_arg(args: tuple, kwargs: dict, tap: Tap) -> torch.Tensor:
    name, position = tap.arg
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise SiteError(f"module {tap.module!r} was called without its {name!r} argument.")


def _heads_in(w: torch.Tensor) -> torch.Tensor:
    """`W_Q/W_K/W_V [n_heads, d_model, d_head]` as `[n_heads·d_head, d_model]`."""
    return w.permute(1, 0, 2).reshape(w.shape[1], -1).T


def _heads_out(w: torch.Tensor) -> torch.Tensor:
    """`W_O [n_heads, d_head, d_model]` as `[d_model, n_heads·d_head]`."""
    return w.reshape(-1, w.shape[-1]).T


# -- HookedTransformer ------------------------------------------------------------------------------------------

Builder = Callable[[], TLSite]
Candidates = Iterator[tuple[str, "Builder | str"]]  # (site name, builder, or why this weight cannot be a site)
SPLIT_INPUTS = "per-head attention inputs (use_split_qkv_input / use_attn_in) are not supported"


def _site(model: nn.Module, name: str, kind: SiteKind, weight: Callable[[], torch.Tensor],
          bias: Callable[[], torch.Tensor | None], route: Route, hook_route: Route | str) -> Builder:
    """A TLSite built only when a target selects it (building one materialises its canonical weight)."""
    return partial(TLSite, model, name, kind, weight, bias, route, hook_route)


#: A TL norm's output from its `hook_normalized` activation `a` (TL norms apply `w`, `b` after that hook), by class.
_NORM_OUTPUTS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "LayerNorm": lambda ln, a: a.to(ln.cfg.dtype) * ln.w + ln.b,
    "RMSNorm": lambda ln, a: a.to(ln.cfg.dtype) * ln.w,
    "LayerNormPre": lambda ln, a: a.to(ln.cfg.dtype),
    "RMSNormPre": lambda ln, a: a.to(ln.cfg.dtype),
}


def _norm_output(ln: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The norm's output as a function of its `hook_normalized` activation; None for norms not in `_NORM_OUTPUTS`."""
    fn = _NORM_OUTPUTS.get(type(ln).__name__)
    return None if fn is None else partial(fn, ln)


def _input_hook(model: nn.Module, layer: int, which: str) -> Tap | str:
    """The TL hook point carrying the input of block `layer`'s `which` ("attn" or "mlp"), or why there is none."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg, p = model.cfg, f"blocks.{layer}"
    ln_name = "ln1" if which == "attn" else "ln2"
    ln = getattr(model.blocks[layer], ln_name)
    if cfg.original_architecture not in POST_NORM_ARCHITECTURES and not isinstance(ln, nn.Identity):
        fn = _norm_output(ln)
        return Tap(f"{p}.{ln_name}.hook_normalized", fn=fn) if fn else f"no hook carries a {type(ln).__name__}'s output"
    if which == "attn":
        return Tap(f"{p}.hook_resid_pre")
    if cfg.use_hook_mlp_in:
        return Tap(f"{p}.hook_mlp_in")
    return Tap(f"{p}.hook_resid_pre" if cfg.parallel_attn_mlp else f"{p}.hook_resid_mid")


def _output_hook(model: nn.Module, layer: int, which: str) -> str | None:
    """`hook_attn_out` / `hook_mlp_out` where it carries the sublayer's output unchanged (no norm after it)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    if cfg.use_normalization_before_and_after or cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return None
    return f"blocks.{layer}.hook_{which}_out"


def _hook_route(read: Tap | str, write: str | None) -> Route | str:
    """The TL hook-point route from an input tap and an output hook; a reason string where either is missing."""
    if isinstance(read, str):
        return read
    return Route(read, write) if write is not None else "a norm follows its output before the next hook point"


def _ht_attention(model: nn.Module, layer: int) -> Candidates:
    cfg, attn, p = model.cfg, model.blocks[layer].attn, f"blocks.{layer}.attn"
    kind = type(attn).__name__
    if kind not in ("Attention", "GroupedQueryAttention") or cfg.load_in_4bit:
        for x in "QKVO":
            yield f"{p}.W_{x}", f"{kind} attention{' in 4 bit' if cfg.load_in_4bit else ''} is not supported"
        return
    grouped = kind == "GroupedQueryAttention" and not cfg.ungroup_grouped_query_attention
    for position, (x, arg) in enumerate(_QKV):
        name, out = f"{p}.W_{x}", f"{p}.hook_{x.lower()}"
        if cfg.use_split_qkv_input or cfg.use_attn_in:
            yield name, f"{SPLIT_INPUTS}; turn them off (model.set_use_split_qkv_input(False), set_use_attn_in(False))"
            continue
        w = f"_W_{x}" if grouped and x != "Q" else f"W_{x}"  # grouped K/V: the stored [n_kv_heads, d_model, d_head]
        read = _input_hook(model, layer, "attn")
        if cfg.positional_embedding_type == "shortformer" and x != "V":
            read = "shortformer attention adds the positional embedding to its query and key inputs"
        yield name, _site(model, name, SiteKind.LINEAR, lambda w=w: _heads_in(getattr(attn, w)),
                          lambda b=w.replace("W_", "b_"): getattr(attn, b).flatten(),
                          Route(Tap(p, (arg, position)), out), _hook_route(read, out))
    z = Tap(f"{p}.hook_z")
    yield f"{p}.W_O", _site(model, f"{p}.W_O", SiteKind.LINEAR, lambda: _heads_out(attn.W_O), lambda: attn.b_O,
                            Route(z, p), _hook_route(z, _output_hook(model, layer, "attn")))


def _ht_mlp(model: nn.Module, layer: int) -> Candidates:
    cfg, p = model.cfg, f"blocks.{layer}.mlp"
    mlp = getattr(model.blocks[layer], "mlp", None)
    if mlp is None:  # attention-only model
        return
    kind = type(mlp).__name__
    if kind not in ("MLP", "GatedMLP"):
        for w in ("W_in", "W_gate", "W_out"):
            yield f"{p}.{w}", f"{kind} MLPs are not supported (only MLP and GatedMLP)"
        return
    read, read_hook = Tap(p, ("x", 0)), _input_hook(model, layer, "mlp")
    if kind == "MLP":
        outputs = {"W_in": ("hook_pre", lambda: mlp.b_in)}
    else:  # GatedMLP: post = act(x W_gate) * (x W_in) + b_in, so neither input map has a bias of its own
        outputs = {"W_gate": ("hook_pre", lambda: None), "W_in": ("hook_pre_linear", lambda: None)}
    for w, (hook, bias) in outputs.items():
        name, out = f"{p}.{w}", f"{p}.{hook}"
        if kind == "GatedMLP" and w == "W_in" and cfg.is_layer_norm_activation():
            yield name, "a gated MLP with a LayerNorm activation (SoLU) never computes x W_in (hook_pre_linear)"
            continue
        yield name, _site(model, name, SiteKind.LINEAR, lambda w=w: getattr(mlp, w).T, bias, Route(read, out),
                          _hook_route(read_hook, out))
    post = Tap(f"{p}.hook_post")
    yield f"{p}.W_out", _site(model, f"{p}.W_out", SiteKind.LINEAR, lambda: mlp.W_out.T, lambda: mlp.b_out,
                              Route(post, p), _hook_route(post, _output_hook(model, layer, "mlp")))


def _ht_candidates(model: nn.Module) -> Candidates:
    cfg = model.cfg
    if cfg.post_embedding_ln:
        yield "embed.W_E", "`embed` applies a LayerNorm after the lookup (post_embedding_ln)"
    else:
        tokens = Route(Tap("hook_tokens"), "hook_embed") if cfg.use_hook_tokens else \
            "no hook point carries the token ids; build the model with use_hook_tokens=True"
        yield "embed.W_E", _site(model, "embed.W_E", SiteKind.EMBEDDING, lambda: model.embed.W_E.T, lambda: None,
                                 Route(Tap("embed", ("tokens", 0)), "embed"), tokens)
    for layer in range(len(model.blocks)):
        yield from _ht_attention(model, layer)
        yield from _ht_mlp(model, layer)
    unembed = Route(Tap("unembed.hook_in"), "unembed.hook_out")
    yield "unembed.W_U", _site(model, "unembed.W_U", SiteKind.LINEAR, lambda: model.unembed.W_U.T,
                               lambda: model.unembed.b_U, unembed, unembed)


# -- TransformerBridge -----------------------------------------------------------------------------------------

def _bridge_site(model: nn.Module, name: str, path: str) -> Builder | str:
    """A site on the HF module that bridge component `path` wraps, hooked on that module itself."""
    try:
        module = model.get_submodule(path).original_component
    except AttributeError:
        return f"the bridge has no component {path!r}"
    weight_fn = canonical_weight_fn(module)
    if weight_fn is None or (isinstance(module, nn.Embedding) and type(module) is not nn.Embedding):
        return f"{path!r} wraps a {type(module).__name__}; supported: nn.Linear, HF Conv1D, plain nn.Embedding"
    kind = SiteKind.EMBEDDING if isinstance(module, nn.Embedding) else SiteKind.LINEAR
    inner = f"{path}.original_component"
    return _site(model, name, kind, lambda: weight_fn(module), lambda: None if kind.reads_tokens else module.bias,
                 Route(Tap(inner, ("input", 0)), inner), Route(Tap(f"{path}.hook_in"), f"{path}.hook_out"))


def _bridge_candidates(model: nn.Module) -> Candidates:
    cfg = model.cfg
    split = getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)
    yield "embed.W_E", _bridge_site(model, "embed.W_E", "embed")
    for layer in range(len(model.blocks)):
        for suffix, sub in _BRIDGE_PATHS.items():
            name = f"blocks.{layer}.{suffix}"
            if split and suffix in ("attn.W_Q", "attn.W_K", "attn.W_V"):
                yield name, f"{SPLIT_INPUTS}: they bypass the q/k/v projections"
                continue
            site = _bridge_site(model, name, f"blocks.{layer}.{sub}")
            if suffix != "mlp.W_gate" or not isinstance(site, str):  # only gated MLPs have a W_gate
                yield name, site
    yield "unembed.W_U", _bridge_site(model, "unembed.W_U", "unembed")


# -- resolution ------------------------------------------------------------------------------------------------

#: Each TransformerLens model family (a class name in the model's MRO) and where its candidate sites come from.
_FAMILIES: dict[str, Callable[[nn.Module], Candidates]] = {"HookedTransformer": _ht_candidates,
                                                           "TransformerBridge": _bridge_candidates}

def _parameter_names(model: nn.Module) -> list[str]:
    if _is_class(model, "TransformerBridge"):
        return [n for n, _ in model.tl_named_parameters()]
    return [n for n, _ in model.named_parameters()]


def _family(model: nn.Module) -> Callable[[nn.Module], Candidates]:
    """The candidate sites of the model's TransformerLens family; a TypeError for other classes."""
    family = next((f for f in _FAMILIES if _is_class(model, f)), None)
    if family is None:
        raise TypeError(f"cannot decompose a TransformerLens {type(model).__name__}; supported are HookedTransformer, "
                        "HookedSAETransformer and TransformerBridge.")
    return _FAMILIES[family]


def sites(model: nn.Module, targets: dict[str, int], identity_targets: dict[str, int] | None = None
          ) -> tuple[list[TLSite], dict[str, int]]:
    """Resolve target globs over the TL weight names into sites; returns the sites and C per site."""
    if identity_targets:
        raise SiteError(f"identity_targets={identity_targets!r}: identity insertion is not supported for "
                        "TransformerLens models yet; pass identity_targets=None.")
    found = dict(_family(model)(model))
    builders = {n: b for n, b in found.items() if not isinstance(b, str)}
    for pattern in targets:
        if not fnmatch.filter(builders, pattern):
            _refuse(pattern, {n: r for n, r in found.items() if isinstance(r, str)}, model, list(builders))
    cs = match_targets(builders, targets, what="decomposable TransformerLens weight")
    return [builders[n]() for n in cs], cs


def _refuse(pattern: str, refused: dict[str, str], model: nn.Module, candidates: list[str]) -> None:
    """Explain why `pattern` selects no site: a weight that is known but refused, or one that is not a site at all."""
    shown = ", ".join(candidates[:40]) + (", …" if len(candidates) > 40 else "")
    hits = fnmatch.filter(refused, pattern)
    if hits:
        raise SiteError(f"{hits[0]!r} cannot be decomposed: {refused[hits[0]]}. "
                        f"Decomposable weights: {shown or '(none)'}.")
    hits = fnmatch.filter(_parameter_names(model), pattern)
    if hits:
        raise SiteError(f"parameter {hits[0]!r} is not a decomposable weight; supported: {SUPPORTED}. "
                        f"Decomposable weights in this model: {shown or '(none)'}.")


# -- the adapter -------------------------------------------------------------------------------------------------

_PER_HEAD_INPUT = re.compile(r"blocks\.\d+\.attn\.W_[QKV]")
_MLP_INPUT = re.compile(r"blocks\.\d+\.mlp\.W_(in|gate)")


class TransformerLensAdapter(Adapter):
    """HookedTransformer-family models (HookedRootModule) and TransformerBridges."""

    final_norms = ("ln_final",)
    residual_writers = re.compile(r"(?:^|\.)(?:mlp\.W_out|attn\.W_O)$")

    def matches(self, model: Any) -> bool:
        return _is_class(model, "HookedRootModule", "TransformerBridge")

    def sites(self, model: Any, targets: dict[str, int], identity_targets: dict[str, int] | None = None
              ) -> tuple[list[Site], dict[str, int]]:
        return sites(model, targets, identity_targets)

    def matrices(self, model: Any) -> list[str]:
        """The blocks' attention and MLP weights this model can decompose (not `embed.W_E`, `unembed.W_U`)."""
        return [n for n, b in _family(model)(model) if not isinstance(b, str) and n not in ("embed.W_E", "unembed.W_U")]

    def hook_names(self, model: Any, site: Site) -> HookNames:
        """The TL hook pair that carries exactly the site's input and output, or a note why there is none."""
        if _is_class(model, "HookedTransformer"):
            if _PER_HEAD_INPUT.fullmatch(site.name):
                return HookNames(note="per-head attention projections write hook_q/k/v [.., n_heads, d_head] from a "
                                      "normalised input no hook carries: no single-hook transcoder equivalent")
            if _MLP_INPUT.fullmatch(site.name):  # HookedSAETransformer's mlp.hook_in is the MLP input
                return HookNames(f"{site.name.rsplit('.', 1)[0]}.hook_in", site.route.write)
        route = getattr(site, "hook_route", None)
        if not isinstance(route, Route) or route.read.fn is not None:
            return HookNames(note=route if isinstance(route, str) else "no TransformerLens hook pair carries this site")
        reshape = "hook_z" if route.read.module.endswith("hook_z") else "none"
        return HookNames(route.read.module, route.write, reshape_activations=reshape)

    def describe(self, module: nn.Module) -> dict:
        """Name, context length and BOS default from the TL config; `HookedTransformer` for that family."""
        cfg = getattr(module, "cfg", None)
        if cfg is None:
            return {}
        ctx = {"model_name": getattr(cfg, "model_name", None), "context_size": getattr(cfg, "n_ctx", None),
               "prepend_bos": getattr(cfg, "default_prepend_bos", None)}
        if _is_class(module, "HookedTransformer"):
            ctx["model_class_name"] = "HookedTransformer"
        return ctx

    def unembedding(self, model: Any) -> torch.Tensor | None:
        """`W_U [d_model, vocab]`, or None."""
        try:
            return model.W_U.detach()
        except (AttributeError, RuntimeError, TypeError):
            return None

    def to_hooked_transformer(self, model: Any) -> Any | None:
        """The model itself when it is a `HookedSAETransformer` (a sae-lens class); None otherwise."""
        return model if any(c.__name__ == "HookedSAETransformer" for c in type(model).__mro__) else None

    def set_weight(self, model: Any, site: Site, weight: torch.Tensor) -> None:
        """A bridge's HF module takes the weight as a torch module does; a HookedTransformer's parameter at the site's
        name (`_W_K`/`_W_V` in grouped-query attention) takes it in its own layout."""
        if _is_class(model, "TransformerBridge"):
            set_module_weight(model, site.route.write, weight)
            return
        path, attr = site.name.rsplit(".", 1)
        owner = model.get_submodule(path)
        params = dict(owner.named_parameters(recurse=False))
        held = [a for a in (f"_{attr}", attr) if a in params and params[a].numel() == site.d_in * site.d_out]
        if not held:
            raise SiteError(f"site {site.name!r} is not one parameter of the model (e.g. grouped-query attention with "
                            "ungroup_grouped_query_attention repeats it per head), so no weight can be written for it; "
                            "use the edit's fwd_hooks instead.")
        old = params[held[0]]
        setattr(owner, held[0], nn.Parameter(_tl_layout(weight, old.shape, held[0]).to(old.dtype).contiguous(),
                                             requires_grad=old.requires_grad))


def _tl_layout(weight: torch.Tensor, shape: torch.Size, attr: str) -> torch.Tensor:
    """A canonical `[d_out, d_in]` weight in the layout of TL parameter `attr` of `shape`: the inverse of `_heads_in`
    (W_Q/K/V `[n_heads, d_model, d_head]`), of `_heads_out` (W_O `[n_heads, d_head, d_model]`) and of `.T`."""
    if len(shape) == 2:
        return weight.T
    if attr.endswith("W_O"):
        return weight.T.reshape(shape)
    return weight.T.reshape(shape[1], shape[0], shape[2]).permute(1, 0, 2)


# -- interventions and caches where the user works -------------------------------------------------------------

def fwd_hooks(dec: Any, masks: dict[str, SiteMask]) -> list[tuple[str, Callable]]:
    """TL `(hook_name, fn)` pairs for `model.run_with_hooks` running the masked sites through their components
    (`SiteComponents.forward`; component masks broadcast over `[batch, pos, C]`)."""
    return site_fwd_hooks(dec, {name: partial(_masked_output, dec.cm.component(name), mask)
                                for name, mask in masks.items()})


def site_fwd_hooks(dec: Any, fns: dict[str, SiteHook]) -> list[tuple[str, Callable]]:
    """TL `(hook_name, fn)` pairs that replace each named site's output with `fns[site](input, output)`: per site,
    one hook records its input and one replaces its output."""
    hooks = []
    for name, fn in fns.items():
        site = dec.cm.sites[name]
        route = getattr(site, "hook_route", None)
        if not isinstance(route, Route):
            why = route or f"its model is a {type(dec.model).__name__}, not a TransformerLens model"
            raise SiteError(f"site {name!r} cannot be reached with TL fwd_hooks: {why}. "
                            "Use dec.run(tokens, masks=...) (for an edit: edit.model()) for this site instead.")
        relay = _Relay(site)
        hooks.append((route.read.module, partial(_record_hook, relay, route.read.fn)))
        hooks.append((route.write, partial(_replace_hook, relay, fn)))
    return hooks


def _record_hook(relay: _Relay, fn: Callable | None, act: torch.Tensor, hook: Any) -> None:
    relay.put(act, fn)


def _replace_hook(relay: _Relay, fn: SiteHook, act: torch.Tensor, hook: Any) -> torch.Tensor:
    return relay.site.replace(fn, relay.take(), act)


def _masked_output(comps: nn.Module, mask: SiteMask, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return comps(x, mask, target_out=target).to(target.dtype)
