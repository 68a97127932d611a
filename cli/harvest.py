"""`decomp-hooks harvest RUN_DIR --data ... --tokens N --out DIR`: per-component statistics over N tokens, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.runs import load_run
from decomp_hooks.cli.export import check_tokens, load_tokens
from decomp_hooks.cli.options import device_option


@click.command("harvest")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Token ids as a safetensors file (tensor 'tokens' [n, seq]), or text files / a directory of them "
                   "(tokenized with the model's tokenizer).")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=1), default=None,
              help="Tokens to harvest, rounded up to whole sequences (default: all of --data).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory; every checkpoint and the result replace it atomically.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face model directory (default: the model the run's config names, e.g. small_lm).")
@click.option("--resume", is_flag=True, help="Continue the unfinished harvest in OUT (pass the same data).")
@click.option("--force", is_flag=True, help="Replace OUT, finished or not.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences per batch.")
@click.option("--context-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per sequence for text data.")
@click.option("--top-k", type=click.IntRange(min=1), default=30, show_default=True,
              help="Top contexts kept per component.")
@click.option("--window", type=click.IntRange(min=0), default=20, show_default=True,
              help="Tokens kept on each side of a top context.")
@click.option("--pmi-top", type=click.IntRange(min=1), default=40, show_default=True,
              help="Tokens of highest PMI kept per component (input token and next token).")
@click.option("--token-counts", type=click.Choice(["auto", "dense", "frequent"]), default="auto", show_default=True,
              help="Joint token counts for PMI: dense [N, vocab] tables, frequent (bounded Misra–Gries summaries), "
                   "or auto (dense while N·vocab ≤ 2²⁵).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=200, show_default=True,
              help="Batches between checkpoints.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar and the closing speed line.")
@device_option
def harvest_command(run_dir: Path, data_path: Path, n_tokens: int | None, out: Path, model_dir: Path | None,
                    resume: bool, force: bool, batch_size: int, context_length: int, top_k: int, window: int,
                    pmi_top: int, token_counts: str, checkpoint_every: int, no_progress: bool, device: Any) -> None:
    """Stream --tokens tokens of --data through the decomposition in RUN_DIR once and keep, for every component of
    every site in memory that does not grow with the tokens: firing count and density, the top contexts by CI-gated
    |activation| (±--window tokens), the input-token and next-token PMI (top --pmi-top tokens), and the co-firing
    counts of all components (cofiring.safetensors, read by clustering). OUT is checkpointed every
    --checkpoint-every batches; --resume continues a stopped harvest to the same result. Dashboards read OUT with
    `decomp-hooks dashboard RUN_DIR --harvest OUT`.

    \b
    Examples (offline):
      decomp-hooks harvest runs/lm_small/vpd-s0 --data text.txt --context-length 64 --tokens 100000 --out harvest/
      decomp-hooks harvest runs/lm_small/vpd-s0 --data text.txt --context-length 64 --tokens 100000 --out harvest/ \\
          --resume                                  # after an interruption: continues from the last checkpoint
      decomp-hooks dashboard runs/lm_small/vpd-s0 --harvest harvest/ --out dash/
    """
    from decomp_hooks import store
    from decomp_hooks.harvest import HarvestConfig, HarvestError, harvest

    try:
        cfg = HarvestConfig(batch_size=batch_size, top_k=top_k, window=window, pmi_top=pmi_top,
                            token_counts=token_counts, checkpoint_every=checkpoint_every)
        dec, tokenizer = load_run(run_dir, model_dir, device)
        data = check_tokens(dec, load_tokens(data_path, tokenizer, context_length, batch_size), data_path)
        result = harvest(dec, data, n_tokens, out, cfg, resume=resume, overwrite=force, dataset=str(data_path),
                         progress=not no_progress)
    except (HarvestError, store.StoreError) as err:
        raise click.ClickException(str(err)) from None
    m = result.meta
    click.echo(f"harvested {m['tokens']:,} tokens ({m['sequences']} sequences of {m['seq_len']}) over "
               f"{len(result.components)} components at {m['tokens_per_s']:,.0f} tokens/s -> {out}")
