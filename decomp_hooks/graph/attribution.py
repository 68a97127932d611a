"""Direct-path attributions between components (docs/graphs.md#nodes-and-edges), by autograd.

One forward over B identical copies of the prompt in which every site's component activations `a = x V` are detached
and re-leafed: the site output is `leaf U + x ΔW + b` (all components on, the delta component unmasked), so its value
is the target's while a gradient of a later activation reaches `leaf` only along paths through no other component.
Each backward seeds one target activation per copy (a batched vector-Jacobian product), so B targets cost one
backward; the attribution of source `c′` to target `c` is `(∂a_c/∂a_c′) · a_c′ · g_c′`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteComponents, SiteMask
from decomp_hooks.graph.inputs import InputNode, TokenInputs, VectorInputs
from decomp_hooks.graph.prompt import GraphError

#: the key of the model output among the tensors a target is read from (site names are the other keys)
OUTPUT = ""


@dataclass
class Releafed:
    """A re-leafed forward: the sites in the order it reached them, per site the activations `x V` (attached to
    the leaves upstream) and their leaves, the output, and the re-leafed input (None if there is none)."""

    order: list[str]
    acts: dict[str, torch.Tensor]
    leaves: dict[str, torch.Tensor]
    output: torch.Tensor
    input_leaf: torch.Tensor | None

    def positions(self, key: str) -> torch.Tensor:
        """Site activations or the output as `[B, P, n]` (P = 1 for inputs without positions)."""
        t = self.output if key == OUTPUT else self.acts[key]
        return t.reshape(t.shape[0], -1, t.shape[-1])


def _releaf(name: str, comps: SiteComponents, fwd: Releafed) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The site hook of a re-leafed forward: record `x V` and its leaf, and output the masked forward on the leaf."""
    ones = torch.ones(comps.C, device=comps.V.device)
    mask = SiteMask(ones, ones.new_ones(()))

    def fn(x: torch.Tensor, target_out: torch.Tensor) -> torch.Tensor:
        if name in fwd.leaves:
            raise GraphError(f"site {name!r} ran twice in one forward; an attribution graph needs every decomposed "
                             "matrix used once per forward.")
        acts = comps.inner_acts(x if comps.kind.reads_tokens else x.to(comps.V.dtype))
        fwd.acts[name], fwd.leaves[name] = acts, acts.detach().requires_grad_(True)
        fwd.order.append(name)
        return comps(x, mask, inner=fwd.leaves[name]).to(target_out.dtype)
    return fn


@contextmanager
def _releafed_sites(cm: ComponentModel, fwd: Releafed) -> Iterator[None]:
    handles = [site.hook(_releaf(name, cm.component(name), fwd)) for name, site in cm.sites.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def releafed_forward(cm: ComponentModel, batch: torch.Tensor, inputs: TokenInputs | VectorInputs) -> Releafed:
    """Run `batch` through the target with every site re-leafed (and the input, where the input kind has one)."""
    fwd = Releafed([], {}, {}, torch.empty(0), None)
    embedding_is_site = any(s.kind.reads_tokens for s in cm.sites.values())
    with torch.enable_grad(), _releafed_sites(cm, fwd):
        run = inputs.forward(cm.target, batch, releaf=not embedding_is_site)
    fwd.output, fwd.input_leaf = run.output, run.leaf
    return fwd


@dataclass
class Sources:
    """The source nodes and how gradients become their attributions. Per site, `selected` `[P, C]` marks the
    component nodes (the rest are summed into one error node per position) and `coef` `[P, C]` is `a · g`."""

    order: list[str]
    selected: dict[str, torch.Tensor]
    coef: dict[str, torch.Tensor]
    inputs: TokenInputs | VectorInputs
    input_nodes: list[InputNode]

    def leaves(self, fwd: Releafed) -> list[torch.Tensor]:
        return [fwd.leaves[n] for n in self.order] + ([fwd.input_leaf] if fwd.input_leaf is not None else [])

    def attributions(self, fwd: Releafed, grads: list[torch.Tensor]) -> torch.Tensor:
        """`[B, n_sources]`: selected components (site by site, position-major), error nodes, input nodes."""
        B = grads[0].shape[0]
        comps, errors = [], []
        for name, grad in zip(self.order, grads):
            contrib = grad.reshape(B, *self.coef[name].shape) * self.coef[name]
            comps.append(contrib[:, self.selected[name]])
            errors.append((contrib * ~self.selected[name]).sum(-1))
        parts = comps + errors
        if fwd.input_leaf is not None and self.input_nodes:
            columns = torch.tensor([n.column for n in self.input_nodes], device=grads[-1].device)
            parts.append(self.inputs.contributions(grads[-1], fwd.input_leaf)[:, columns])
        return torch.cat(parts, 1)


@dataclass
class TargetNodes:
    """Target activations to differentiate: the tensor each is read from (`OUTPUT` or a site), position and index."""

    keys: list[str]
    pos: torch.Tensor
    index: torch.Tensor


def _seeded(fwd: Releafed, keys: list[str], code: torch.Tensor, targets: TargetNodes,
            chunk: slice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors a chunk of targets is read from and their seeds: copy b of the batch seeds the chunk's b-th target."""
    outs, seeds = [], []
    for k in code[chunk].unique().tolist():
        t = fwd.positions(keys[k])
        if not t.requires_grad:  # reads no leaf: its attributions are zero
            continue
        b = (code[chunk] == k).nonzero().flatten()
        seed = torch.zeros_like(t)
        seed[b.to(t.device), targets.pos[chunk][b].to(t.device), targets.index[chunk][b].to(t.device)] = 1.0
        outs.append(t)
        seeds.append(seed)
    return outs, seeds


def attribution_rows(fwd: Releafed, sources: Sources, targets: TargetNodes) -> torch.Tensor:
    """`[n_targets, n_sources]`: each target's direct-path attributions, one backward per B targets."""
    copies, leaves = fwd.output.shape[0], sources.leaves(fwd)
    keys = list(dict.fromkeys(targets.keys))
    code = torch.tensor([keys.index(k) for k in targets.keys])
    rows = []
    for start in range(0, len(code), copies):
        chunk = slice(start, min(start + copies, len(code)))
        outs, seeds = _seeded(fwd, keys, code, targets, chunk)
        grads = torch.autograd.grad(outs, leaves, seeds, retain_graph=True, allow_unused=True,
                                    materialize_grads=True) if outs else [torch.zeros_like(x) for x in leaves]
        rows.append(sources.attributions(fwd, list(grads))[: chunk.stop - chunk.start].detach())
    return torch.cat(rows)
