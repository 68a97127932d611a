"""What a graph is built for: the prompt as one model input, its position labels, and the target outputs.

A prompt is text (tokenized with the model's tokenizer), token ids, or, for models that read vectors (the toys), one
input vector (a graph over a single position). Every bad value is refused before the model runs, naming it and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from decomp_hooks.model_call import run_model
from decomp_hooks.train.preflight import vocab_size


class GraphError(ValueError):
    """A prompt, target or setting an attribution graph cannot be built from; the message names it and the fix."""


@dataclass
class Prompt:
    """One model input `batch` (`[1, T]` token ids or `[1, d]` a vector), a label per position, the text shown."""

    batch: torch.Tensor
    labels: list[str]
    text: str
    tokenizer: Any = None

    @property
    def reads_tokens(self) -> bool:
        return not self.batch.is_floating_point()


@dataclass
class Target:
    """An output the graph explains: `index` (token id or output unit) at the last position, its label, value and
    weight in the influence (its probability for token outputs, an equal share for vector outputs)."""

    index: int
    label: str
    value: float
    weight: float


def show_token(text: str) -> str:
    """A token string with newlines, tabs and carriage returns made visible (as circuit-tracer writes them)."""
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def check_fraction(name: str, value: Any, low: float, high: float, high_included: bool = True) -> float:
    """`value` as a float in [low, high] (or [low, high)), else a GraphError naming it and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high or (value == high and not high_included):
        bound = "]" if high_included else ")"
        raise GraphError(f"{name}={value!r} is out of range; give a number in [{low}, {high}{bound}.")
    return float(value)


def read_prompt(model: torch.nn.Module, prompt: Any, tokenizer: Any, context: int | None) -> Prompt:
    """The prompt as one model input: text (through `tokenizer`), token ids, or a vector (for toys, no vocabulary)."""
    vocab = vocab_size(model)
    if isinstance(prompt, str):
        return _text_prompt(prompt, tokenizer, context)
    if isinstance(prompt, (list, tuple)):
        prompt = torch.tensor(prompt)
    if not isinstance(prompt, torch.Tensor):
        raise GraphError(f"prompt is a {type(prompt).__name__}; pass text, a list of token ids or a tensor.")
    if prompt.dim() == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise GraphError(f"prompt has shape {list(prompt.shape)}; pass one non-empty sequence of token ids or one "
                         "input vector ([T] or [1, T]).")
    if prompt.is_floating_point():
        return _vector_prompt(prompt, vocab)
    return _id_prompt(prompt, vocab, tokenizer, context)


def _text_prompt(text: str, tokenizer: Any, context: int | None) -> Prompt:
    if not text.strip():
        raise GraphError(f"prompt={text!r} is empty; give text with at least one token.")
    if tokenizer is None:
        raise GraphError("prompt is text, but the model carries no tokenizer; pass tokenizer=... or token ids.")
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise GraphError(f"prompt={text!r} tokenizes to no tokens; give other text.")
    _check_length(len(ids), context, text)
    return Prompt(torch.tensor([ids]), [show_token(tokenizer.decode([i])) for i in ids], text, tokenizer)


def _id_prompt(ids: torch.Tensor, vocab: int | None, tokenizer: Any, context: int | None) -> Prompt:
    if vocab is None:
        raise GraphError(f"prompt is integer token ids ({ids.dtype}), but the model has no vocabulary; pass its input "
                         "vector as a float tensor.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise GraphError(f"prompt token ids range over [{int(ids.min())}, {int(ids.max())}], outside the vocabulary "
                         f"(ids 0..{vocab - 1}); tokenize with the model's own tokenizer.")
    _check_length(len(ids), context, f"{len(ids)} token ids")
    labels = [show_token(tokenizer.decode([int(i)])) if tokenizer is not None else str(int(i)) for i in ids]
    text = tokenizer.decode(ids.tolist()) if tokenizer is not None else " ".join(labels)
    return Prompt(ids.long().unsqueeze(0), labels, text, tokenizer)


def _vector_prompt(x: torch.Tensor, vocab: int | None) -> Prompt:
    if vocab is not None:
        raise GraphError(f"prompt is a float tensor of shape {list(x.shape)}, but the model reads token ids (a "
                         f"vocabulary of {vocab}); pass text or integer token ids.")
    if not torch.isfinite(x).all():
        raise GraphError(f"prompt vector {x.tolist()} holds NaN or Inf; pass finite values.")
    nonzero = x.nonzero().flatten().tolist()
    shown = ", ".join(f"x[{i}] = {float(x[i]):.3g}" for i in nonzero) or "x = 0"
    rest = f" (the other {x.numel() - len(nonzero)} of {x.numel()} entries 0)" if len(nonzero) < x.numel() else ""
    return Prompt(x.float().unsqueeze(0), ["x"], shown + rest)


def _check_length(n: int, context: int | None, what: str) -> None:
    if context is not None and n > context:
        shown = what if len(what) <= 40 else what[:40] + "…"
        raise GraphError(f"prompt {shown!r} is {n} tokens, longer than the model's context of {context}; shorten it.")


def read_targets(model: torch.nn.Module, prompt: Prompt, target: Any) -> list[Target]:
    """The outputs to explain at the last position: `target` as a token string, token id or output index, or a list of
    them; None picks the top prediction."""
    with torch.no_grad():
        out = run_model(model, prompt.batch).float()
    last = out.reshape(out.shape[0], -1, out.shape[-1])[0, -1]
    wanted = [int(last.argmax())] if target is None else [
        _target_index(t, prompt, last.numel()) for t in (target if isinstance(target, (list, tuple)) else [target])]
    if not wanted:
        raise GraphError("target=[] names no output; give a token, a token id, or None for the top prediction.")
    if len(set(wanted)) != len(wanted):
        raise GraphError(f"target={target!r} names an output twice; name each once.")
    probs = torch.softmax(last, -1) if prompt.reads_tokens else torch.full_like(last, 1 / len(wanted))
    return [Target(i, _output_label(i, prompt), float(last[i]), float(probs[i])) for i in wanted]


def _target_index(target: Any, prompt: Prompt, n_outputs: int) -> int:
    if isinstance(target, str):
        if prompt.tokenizer is None:
            raise GraphError(f"target={target!r} is text, but there is no tokenizer; give the output index.")
        ids = prompt.tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [prompt.tokenizer.decode([i]) for i in ids]
            raise GraphError(f"target={target!r} is {len(ids)} tokens {pieces}, not one token of the vocabulary; give "
                             "a single token (e.g. with its leading space) or its id.")
        return int(ids[0])
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_outputs:
        raise GraphError(f"target={target!r} is not an output of the model; give a token or an index in "
                         f"[0, {n_outputs - 1}].")
    return target


def _output_label(index: int, prompt: Prompt) -> str:
    return show_token(prompt.tokenizer.decode([index])) if prompt.tokenizer is not None else f"y[{index}]"
