"""`decomp-hooks cluster RUN_DIR --data ... --out FILE_OR_DIR`: cluster components by co-firing (MDL merge)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.runs import load_run
from decomp_hooks.cli.export import check_tokens, load_tokens
from decomp_hooks.cli.options import NumberRange, check_out, device_option


@click.command("cluster")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Inputs: token ids as a safetensors file (tensor 'tokens' [n, seq]) or text files / a directory of "
                   "them (tokenized with --model's tokenizer); toy runs may leave it out (inputs are drawn from the "
                   "toy's distribution).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="A .json file (clusters.json), or a directory: clusters.json + clusters.html (written atomically).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face model directory of a language-model run (as for `export`).")
@click.option("--threshold", type=NumberRange(0, 1, max_open=True), default=0.01, show_default=True,
              help="A component fires on a token where its causal importance exceeds this (τ).")
@click.option("--alpha", type=NumberRange(min=0), default=10.0, show_default=True,
              help="Weight of the rank term of the description length (α).")
@click.option("--rank-decay", type=NumberRange(min=0, min_open=True), default=0.2, show_default=True,
              help="Merge the pair at cost rank J with probability ∝ exp(-rank_decay·J); 'inf': always the cheapest.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the merge sampler.")
@click.option("--max-tokens", type=click.IntRange(min=1, max=2**31 - 1), default=500_000, show_default=True,
              help="Token positions (a toy's rows) whose firing is kept; memory grows with it (1 bit per component).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences per batch.")
@click.option("--context-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per sequence for text data.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@device_option
def cluster_command(run_dir: Path, data_path: Path | None, out: Path, model_dir: Path | None, threshold: float,
                    alpha: float, rank_decay: float, seed: int, max_tokens: int, batch_size: int, context_length: int,
                    force: bool, no_progress: bool, device: Any) -> None:
    """Cluster the components of the decomposition in RUN_DIR by co-firing, with the MDL merge of VPD: a streaming
    pass over --data keeps which components fire on each of up to --max-tokens tokens (CI > --threshold), then pairs
    of groups are merged, sampled by merge cost, down to one cluster; the clustering kept is the step of least
    description length. Writes clusters.json (members as [site, index], firing counts, the cost per merge step, the
    kept step, the settings) and, for a directory OUT, the cluster page clusters.html.

    RUN_DIR may instead be a harvest directory (harvest.json + cofiring.safetensors): its pairwise counts are exact
    only up to the first merge, so later merges use a bound (docs/clustering.md).

    \b
    Examples (offline, from an empty folder):
      decomp-hooks toy lm --out models/small-lm
      decomp-hooks decompose lm/small_spd --model models/small-lm --steps 50 --out runs/small-lm
      python -m pydoc json collections > text.txt
      decomp-hooks cluster runs/small-lm --model models/small-lm --data text.txt --max-tokens 20000 --out clusters/
      decomp-hooks decompose tms_5-2 --out runs/tms
      decomp-hooks cluster runs/tms --max-tokens 20000 --out runs/tms/clusters.json
    """
    from decomp_hooks.clustering import ClusterError, cluster
    from decomp_hooks.data import DataError
    from decomp_hooks.store import StoreError

    if out.suffix == ".json":
        if out.exists() and not force:
            raise click.ClickException(f"{str(out)!r} already exists; choose another path or pass --force.")
    else:
        check_out(out, force, run_dir, *([data_path] if data_path else []))
    settings = dict(threshold=threshold, alpha=alpha, rank_decay=rank_decay, seed=seed, max_tokens=max_tokens,
                    batch_size=batch_size, overwrite=force, progress=not no_progress)
    try:
        if (run_dir / "cofiring.safetensors").is_file():
            if data_path is not None:
                raise click.BadParameter(f"{str(run_dir)!r} is a harvest directory, which holds its own counts; "
                                         "leave out --data, or give a run directory.", param_hint="--data")
            clusters = cluster(run_dir, out=out, **settings)
        else:
            dec, tokenizer = load_run(run_dir, model_dir, device)
            clusters = cluster(dec, inputs(dec, data_path, tokenizer, context_length, batch_size, max_tokens, seed),
                               out=out, **settings)
    except (ClusterError, DataError, StoreError) as err:
        raise click.ClickException(str(err)) from None
    groups = clusters.clusters()
    click.echo(f"clustered {len(clusters.components)} components ({len(clusters.dead)} never fired) over "
               f"{clusters.tokens} tokens: kept merge step {clusters.chosen_step} of {len(clusters.merges)}, "
               f"{len(groups)} clusters ({sum(g['rank'] > 1 for g in groups)} with two or more members)")
    click.echo(f"wrote {out}")


def inputs(dec: Any, data_path: Path | None, tokenizer: Any, context_length: int, batch_size: int, max_tokens: int,
           seed: int) -> Any:
    """The --data inputs, or `max_tokens` inputs drawn from a toy target's own distribution (seeded)."""
    if data_path is not None:
        return check_tokens(dec, load_tokens(data_path, tokenizer, context_length, batch_size), data_path)
    import torch

    from decomp_hooks.toy import ToyModel, toy_sampler

    if not isinstance(dec.model, ToyModel):
        raise click.BadParameter("pass the inputs to read firing from (token ids or text for a language model), or a "
                                 "harvest directory as RUN_DIR.", param_hint="--data")
    torch.manual_seed(seed)
    return toy_sampler(dec.model, dec.device)(max_tokens)
