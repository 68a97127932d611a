"""Input nodes: where a graph's attributions start, one kind per kind of model input.

Token ids: one node per position, the token's embedding vector `e` as the first layer reads it (the input embedding's
output, re-leafed), attribution `(∂a/∂e)·e`. A vector (the toys): one node per non-zero entry `x_i` at position 0 (the
input itself, re-leafed), attribution `(∂a/∂x_i)·x_i`. Positional embeddings and biases are constants, not nodes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from decomp_hooks.model_call import run_model


@dataclass
class InputNode:
    """One input node: its position, its index (token id or input entry), its label, and its column in the input
    kind's `contributions`."""

    pos: int
    index: int
    label: str
    column: int


@dataclass
class InputForward:
    """A forward's output `[B, ...]` and the re-leafed input (None where the model has no input to re-leaf)."""

    output: torch.Tensor
    leaf: torch.Tensor | None


def input_embedding(module: nn.Module) -> nn.Module | None:
    """The module whose output is the token embeddings: `get_input_embeddings()` (Hugging Face) or `embed`
    (TransformerLens)."""
    getter = getattr(module, "get_input_embeddings", None)
    found = None
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
    found = found if isinstance(found, nn.Module) else getattr(module, "embed", None)
    return found if isinstance(found, nn.Module) else None


class TokenInputs:
    """Token-id prompts: the embedding at each position is one node."""

    def nodes(self, batch: torch.Tensor, labels: list[str]) -> list[InputNode]:
        return [InputNode(t, int(i), f'Emb: "{labels[t]}"', t) for t, i in enumerate(batch[0].tolist())]

    def forward(self, module: nn.Module, batch: torch.Tensor, releaf: bool) -> InputForward:
        """Run `batch` with the embedding output re-leafed, unless not `releaf` (the embedding is a decomposed site:
        its components are then the graph's first nodes)."""
        emb = input_embedding(module)
        if emb is None or not releaf:
            return InputForward(run_model(module, batch), None)
        box: dict[str, torch.Tensor] = {}

        def releaf(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            box["leaf"] = out.detach().requires_grad_(True)
            return box["leaf"]

        handle = emb.register_forward_hook(releaf)
        try:
            out = run_model(module, batch)
        finally:
            handle.remove()
        return InputForward(out, box.get("leaf"))

    def contributions(self, grad: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """`(∂a/∂e_t)·e_t` per position: `[B, T]`."""
        return (grad * leaf).sum(-1)


class VectorInputs:
    """Vector prompts: each non-zero input entry is one node at position 0."""

    def nodes(self, batch: torch.Tensor, labels: list[str]) -> list[InputNode]:
        x = batch[0]
        return [InputNode(0, i, f"x[{i}] = {float(x[i]):.3g}", i) for i in x.nonzero().flatten().tolist()]

    def forward(self, module: nn.Module, batch: torch.Tensor, releaf: bool) -> InputForward:
        """Run `batch` as a leaf (a vector input is never a decomposed site)."""
        leaf = batch.detach().clone().requires_grad_(True)
        return InputForward(run_model(module, leaf), leaf)

    def contributions(self, grad: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """`(∂a/∂x_i)·x_i` per input entry: `[B, d]`."""
        return grad * leaf


#: the input kind of a prompt batch, by whether it holds token ids
INPUT_KINDS: dict[bool, Callable[[], TokenInputs | VectorInputs]] = {True: TokenInputs, False: VectorInputs}
