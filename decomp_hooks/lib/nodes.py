"""Node layers of a model: read their activations in a forward pass and run the section between two of them.

A node layer is one module output (an HF module path, a TransformerLens hook point) or a tuple of them,
concatenated along the last dimension; `"output"` is the model's return value. Activations are seen as
`[batch, positions, width]`; from `last_position_from` on only the last position is kept
(docs/methods/lib.md#node-layers).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from decomp_hooks.data import batch_rows
from decomp_hooks.model_call import run_model

OUTPUT = "output"


class NodeError(ValueError):
    """A node layer name the model does not have, or an activation LIB cannot read; the message names it."""


class _Stop(Exception):
    """Raised by a capture hook once the wanted node layer is read, so the rest of the forward is skipped."""


def _as_3d(a: Tensor) -> Tensor:
    """`[B, d]` → `[B, 1, d]`; `[B, P, *rest]` → `[B, P, prod(rest)]`."""
    if a.dim() < 2:
        raise NodeError(f"a node activation of shape {tuple(a.shape)} has no batch and feature dimension.")
    return a.unsqueeze(1) if a.dim() == 2 else a.reshape(*a.shape[:2], -1)


class NodeLayers:
    """The model's node layers, in forward order, with readers and the section maps between them."""

    def __init__(self, model: nn.Module, layers: list[str | list[str]], last_position_from: str | None = None):
        if len(layers) < 2:
            raise NodeError(f"layers={layers!r}: LIB needs at least two node layers (the last is usually 'output').")
        self.model = model
        self.members = [[m] if isinstance(m, str) else list(m) for m in layers]
        self.names = ["+".join(m) for m in self.members]
        modules = dict(model.named_modules())
        for name in (n for ms in self.members for n in ms):
            if name != OUTPUT and name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise NodeError(f"node layer {name!r} is not a module of this {type(model).__name__}.{hint} Node layers "
                                "are module paths of named_modules() (TransformerLens hook points included) or 'output'.")
        if any(OUTPUT in ms for ms in self.members[:-1]) or (OUTPUT in self.members[-1] and len(self.members[-1]) > 1):
            raise NodeError("'output' can only be the last node layer, on its own.")
        if last_position_from is not None and last_position_from not in self.names:
            raise NodeError(f"last_position_from={last_position_from!r} is not one of the node layers {self.names}.")
        start = self.names.index(last_position_from) if last_position_from else len(self.names)
        self.last_only = [i >= start for i in range(len(self.names))]
        self.modules = {n: modules[n] for ms in self.members for n in ms if n != OUTPUT}
        self.widths: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.names)

    def _select(self, layer: int, a: Tensor) -> Tensor:
        a = _as_3d(a)
        return a[:, -1:] if self.last_only[layer] else a

    def member_slices(self, layer: int) -> dict[str, slice]:
        """Where each member's coordinates sit in the node activation (known after the first `read`)."""
        out, start = {}, 0
        for name, width in zip(self.members[layer], self.widths[layer]):
            out[name] = slice(start, start + width)
            start += width
        return out

    def read(self, batch: Any, layers: list[int] | None = None) -> list[Tensor]:
        """Node activations `[B, P, d]` of `layers` (default all) in one forward pass, stopping after the last one."""
        layers = list(range(len(self))) if layers is None else layers
        grabbed: dict[str, Tensor] = {}
        wanted = {n for i in layers for n in self.members[i] if n != OUTPUT}
        need_output = any(OUTPUT in self.members[i] for i in layers)

        def grab(name: str) -> Callable:
            def hook(module, args, out):
                if not isinstance(out, Tensor):
                    raise NodeError(f"node layer {name!r} outputs a {type(out).__name__}, not a tensor; pick a module "
                                    "(or TransformerLens hook point) whose output is one tensor.")
                grabbed[name] = out
                if not need_output and wanted <= grabbed.keys():
                    raise _Stop
            return hook

        handles = [self.modules[n].register_forward_hook(grab(n)) for n in wanted]
        self._call(batch, handles, grabbed)
        acts = []
        for i in layers:
            parts = [self._select(i, grabbed[n]) for n in self.members[i]]
            if len(self.widths) < len(self):
                self.widths = [[0] * len(ms) for ms in self.members]
            self.widths[i] = [p.shape[-1] for p in parts]
            acts.append(torch.cat(parts, -1))
        return acts

    def _call(self, batch: Any, handles: list, grabbed: dict[str, Tensor]) -> None:
        """Run the model with `handles` attached (a hook may stop it early with _Stop), then remove them."""
        try:
            grabbed[OUTPUT] = run_model(self.model, batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def run_from(self, layer: int, batch: Any, x: Tensor, until: int | None = None) -> Tensor:
        """Run `batch` with node layer `layer` replaced by `x` `[B', P, d]` and return node layer `until` (default the
        next one). `B'` may be a multiple `r` of the batch size (r variants of the node, repeat-major): the upstream
        part runs once on the batch when the model allows it, else on the batch repeated r times. The map is
        differentiable in `x`."""
        if x.shape[0] != batch_rows(batch):
            try:
                return self._run_from(layer, batch, x, until)
            except RuntimeError:  # something computed upstream is used downstream with the batch's own size
                batch = _repeat(batch, x.shape[0] // batch_rows(batch))
        return self._run_from(layer, batch, x, until)

    def _run_from(self, layer: int, batch: Any, x: Tensor, until: int | None) -> Tensor:
        until = layer + 1 if until is None else until
        pieces = dict(zip(self.members[layer], x.split(self.widths[layer], -1)))
        grabbed: dict[str, Tensor] = {}
        targets = [n for n in self.members[until] if n != OUTPUT]

        def put(name: str) -> Callable:
            def hook(module, args, out):
                return self._place(layer, out, pieces[name])
            return hook

        def grab(name: str) -> Callable:
            def hook(module, args, out):
                grabbed[name] = out
                if len(grabbed) == len(targets):
                    raise _Stop
            return hook

        handles = [self.modules[n].register_forward_hook(put(n)) for n in self.members[layer]]
        handles += [self.modules[n].register_forward_hook(grab(n)) for n in targets]
        self._call(batch, handles, grabbed)
        return torch.cat([self._select(until, grabbed[n]) for n in self.members[until]], -1)

    def _place(self, layer: int, out: Tensor, piece: Tensor) -> Tensor:
        """The module output `out` with the node's positions replaced by `piece` `[B, P_node, w]`, in `out`'s layout."""
        if out.dim() == 2:
            return piece[:, 0]
        piece = piece.reshape(*piece.shape[:2], *out.shape[2:])
        if self.last_only[layer] and out.shape[1] > 1:
            rest = out[:, :-1].repeat(piece.shape[0] // out.shape[0], *([1] * (out.dim() - 1)))
            return torch.cat([rest, piece], 1)
        return piece


def _repeat(batch: Any, times: int) -> Any:
    """The batch stacked `times` times along dim 0 (repeat-major: copy r holds rows r·B … r·B + B − 1)."""
    if isinstance(batch, dict):
        return {k: _repeat(v, times) for k, v in batch.items()}
    return batch.repeat(times, *([1] * (batch.dim() - 1)))
