"""Decompose a TransformerLens model's MLP input matrices, then use the components with TL's own hook API.

    python examples/transformer_lens.py [--steps 200]

Offline: a small random GPT-2 in a `TransformerBridge` (TransformerLens 3's recommended model), with the GPT-2
tokenizer and the standard library's docstrings as text. Sites are TransformerLens parameter names
(`blocks.*.mlp.W_in`, `blocks.*.attn.W_Q`, `embed.W_E`, ...); the same script works on a `HookedTransformer`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# this file's name would shadow the transformer_lens package when run as a script: drop its folder from the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import decomp_hooks as dh  # noqa: E402
from decomp_hooks.assets import gpt2_tokenizer  # noqa: E402
from decomp_hooks.text import TokenBatches, stdlib_docstrings  # noqa: E402

CONFIG = "lm_tiny"  # the shipped SPD settings for a small LM (a config name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()  # dropout off
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok, device="cpu")
    data = TokenBatches(stdlib_docstrings(limit=400), tok, context_length=64, batch_size=8, max_context=64)
    dec = dh.decompose(model, data, targets={"blocks.*.mlp.W_in": 64}, config=CONFIG, steps=args.steps)
    final = dec.final_metrics()
    print(f"KL ci_masked {final['eval/kl_ci_masked']:.4g}  unmasked {final['eval/kl_unmasked']:.4g}")

    tokens = model.to_tokens("Return the number of items in the container.")
    logits, cache = dec.run_with_cache(tokens)                 # TL-style cache of component activations and CI
    ci = cache["blocks.0.mlp.W_in.hook_ci"][0]                 # [pos, C]
    top = ci.mean(0).topk(3).indices.tolist()
    print(f"blocks.0.mlp.W_in: most important components on the prompt {top}")
    ablated = model.run_with_hooks(tokens, fwd_hooks=dec.fwd_hooks(ablate={"blocks.0.mlp.W_in": top}))
    change = (ablated.log_softmax(-1) - logits.log_softmax(-1)).abs().max().item()
    print(f"run_with_hooks with them ablated: largest log-prob change {change:.4g}")
    same = model.run_with_hooks(tokens, fwd_hooks=dec.fwd_hooks())  # all components on + delta: the model itself
    print(f"all components on: max |logit difference| {(same - logits).abs().max().item():.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
