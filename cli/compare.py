"""`decomp-hooks compare RUN_DIR SAE_DIR --data ... --out DIR`: a site's components against an SAE-Lens SAE's features."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.runs import load_run
from decomp_hooks.cli.export import check_tokens, load_tokens
from decomp_hooks.cli.options import NumberRange, check_out, device_option


@click.command("compare")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("sae_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Token ids as a safetensors file (tensor 'tokens' [n, seq]), or text files / a directory of them.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory: summary.json, components.csv, features.csv, compare.html (written atomically).")
@click.option("--site", default=None, help="The decomposed site the SAE sits on (default: the only site, or the "
                                           "one whose hooks the SAE's cfg.json names).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face model directory of a language-model run (as for `export`).")
@click.option("--min-cosine", type=NumberRange(-1, 1), default=0.5, show_default=True, help="Decoder cosine that counts as a match.")
@click.option("--min-corr", type=NumberRange(-1, 1), default=0.5, show_default=True,
              help="Activation correlation that counts as a match.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Best features listed per component.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences per batch.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Read at most this many batches of --data.")
@click.option("--context-length", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per sequence for text data.")
@click.option("--harvest", "harvest_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A finished `decomp-hooks harvest` of RUN_DIR: the components' firing, liveness and top contexts "
                   "come from it; --data still gives the correlations and the SAE's side.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@device_option
def compare_command(run_dir: Path, sae_dir: Path, data_path: Path, out: Path, site: str | None, model_dir: Path | None,
                    min_cosine: float, min_corr: float, top_k: int, batch_size: int, max_batches: int | None,
                    context_length: int, harvest_dir: Path | None, force: bool, no_progress: bool,
                    device: Any) -> None:
    """Match the components of one site in RUN_DIR to the features of the SAE-Lens SAE or transcoder in SAE_DIR
    (cfg.json + sae_weights.safetensors) trained on the same hook: decoder-direction cosine and activation
    correlation over the same tokens of --data. Each component counts as two parts (its positive and negative
    activations, as in the ±-split export). Writes a per-component table (best features), a per-feature table (best
    component, explained or not), summary.json with the headline figures, and compare.html, which shows every live
    component beside its best-matching SAE feature, then the SAE features no component explains and vice versa.

    \b
    Examples (offline, from an empty folder; SAE_DIR is any SAE-Lens directory on the site's hooks, here the
    same site of a second decomposition, exported as a transcoder):
      decomp-hooks toy lm --out models/small-lm
      decomp-hooks decompose lm/small_spd --model models/small-lm --steps 50 --out runs/small-lm
      decomp-hooks decompose lm/small_spd --model models/small-lm --steps 50 --seed 1 --out runs/small-lm-s1
      decomp-hooks export runs/small-lm-s1 exports/small-lm-s1 --model models/small-lm \\
          --sites model.layers.0.mlp.down_proj
      python -m pydoc json collections > text.txt    # any text; here stdlib docs, as the LM was trained on
      decomp-hooks compare runs/small-lm exports/small-lm-s1/model.layers.0.mlp.down_proj \\
          --model models/small-lm --data text.txt --site model.layers.0.mlp.down_proj --out cmp/
      decomp-hooks compare runs/small-lm exports/small-lm-s1/model.layers.0.mlp.down_proj \\
          --model models/small-lm --data text.txt --min-cosine 0.7 --min-corr 0.6 --out cmp/ --force
    """
    from decomp_hooks import store
    from decomp_hooks.dashboard import CompareConfig, DashboardError, compare_with_sae
    from decomp_hooks.data import DataError
    from decomp_hooks.export import load_sae

    check_out(out, force, run_dir, sae_dir, data_path, harvest_dir)
    try:
        sae = load_sae(sae_dir)
    except store.StoreError as err:
        raise click.BadParameter(str(err), param_hint="SAE_DIR") from None
    dec, tokenizer = load_run(run_dir, model_dir, device)
    site = site or pick_site(dec, sae)
    data = check_tokens(dec, load_tokens(data_path, tokenizer, context_length, batch_size), data_path)
    cfg = CompareConfig(min_cosine=min_cosine, min_corr=min_corr, top_k=top_k, batch_size=batch_size,
                        max_batches=max_batches)
    try:
        result = compare_with_sae(dec, site, sae, data, out=out, config=cfg, tokenizer=tokenizer, overwrite=force,
                                  progress=not no_progress, harvest=harvest_dir)
    except (DashboardError, DataError, store.StoreError) as err:
        raise click.ClickException(str(err)) from None
    s = result.summary()
    click.echo(f"{site} vs {sae_dir}: {s['live_components']}/{s['components']} live components, "
               f"{s['live_features']}/{s['features']} live SAE features")
    click.echo(f"matched pairs {s['matched_pairs']}  mean best cosine {s['mean_best_cosine_per_component']:.3f} "
               f"(per component) / {s['mean_best_cosine_per_feature']:.3f} (per feature)  mean best correlation "
               f"{s['mean_best_corr_per_component']:.3f} / {s['mean_best_corr_per_feature']:.3f}")
    click.echo(f"unexplained: {s['unexplained_features']} SAE features, {s['unexplained_components']} components  "
               f"-> {out / 'compare.html'}")


def pick_site(dec: Any, sae: Any) -> str:
    """The site an SAE belongs to: the only site, or the one whose module or hook names the SAE names."""
    from decomp_hooks.adapters import adapter_for

    if len(dec.site_names) == 1:
        return dec.site_names[0]
    named = {sae.hf_hook_name, sae.hf_hook_name_out, sae.hook_name, sae.hook_name_out} - {None}
    adapter = adapter_for(dec.model)

    def hooks(n: str) -> set:
        return set(adapter.hook_names(dec.model, dec.cm.sites[n]).names().values()) - {None}

    hits = [n for n in dec.site_names if n in named or hooks(n) & named]
    if len(hits) != 1:
        raise click.BadParameter(f"cannot tell which site the SAE belongs to (candidates {hits or dec.site_names}); "
                                 "pass --site.", param_hint="--site")
    return hits[0]
