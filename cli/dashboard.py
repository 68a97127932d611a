"""`decomp-hooks dashboard RUN_DIR --data ... --out DIR`: one self-contained HTML page per site's components."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.export import check_tokens, load_tokens
from decomp_hooks.cli.options import check_out, device_option
from decomp_hooks.cli.runs import load_run


def parse_components(values: tuple[str, ...]) -> list[int] | None:
    """'0,3,5' (repeatable) as a list of ints; None when not given."""
    if not values:
        return None
    try:
        return [int(v) for value in values for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{values}: give component indices as integers, e.g. --components 0,3,5.",
                                 param_hint="--components") from None


@click.command("dashboard")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Token ids as a safetensors file (tensor 'tokens' [n, seq]), or text files / a directory of them "
                   "(tokenized with --model's tokenizer). Required unless --harvest is given.")
@click.option("--harvest", "harvest_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A finished `decomp-hooks harvest` of this run: its statistics, top contexts and PMI tokens are "
                   "shown instead of a pass over --data (native engine).")
@click.option("--clusters", "clusters_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="clusters.json (or its directory) from `decomp-hooks cluster` of this run: adds clusters.html, "
                   "linked from the index, whose members link to their components.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (written atomically).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face model directory of a language-model run (as for `export`).")
@click.option("--sites", multiple=True, metavar="PATTERN", help="fnmatch pattern over site names (repeatable).")
@click.option("--components", multiple=True, metavar="LIST", help="Component indices to show, e.g. 0,3,5 "
                                                                   "(default: every component that fires).")
@click.option("--engine", type=click.Choice(["native", "sae-dashboard"]), default="native", show_default=True,
              help="native: decomp-hooks pages (CI and signed-activation highlighting). sae-dashboard: its SaeVisRunner "
                   "on the sites exported as ±-split transcoders (needs sae-dashboard, installed with --no-deps).")
@click.option("--n-examples", type=click.IntRange(min=1), default=10, show_default=True, help="Top contexts per component.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences per batch.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Read at most this many batches of --data.")
@click.option("--context-length", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per sequence for text data.")
@click.option("--model-name", default=None, help="Model name shown on the pages.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@device_option
def dashboard_command(run_dir: Path, data_path: Path | None, harvest_dir: Path | None, clusters_path: Path | None,
                      out: Path,
                      model_dir: Path | None, sites: tuple[str, ...],
                      components: tuple[str, ...], engine: str, n_examples: int, batch_size: int,
                      max_batches: int | None, context_length: int, model_name: str | None, force: bool,
                      no_progress: bool, device: Any) -> None:
    """Dashboards of the components in RUN_DIR, computed over --data: one self-contained HTML page per site (no
    network needed to open it) with, per live component, its top token contexts coloured by causal importance and by
    signed activation, CI and activation histograms, firing frequency, the tokens it promotes and suppresses (sites
    that write to the residual stream), its most co-active components; plus <site>.neuronpedia.json, index.html and
    dashboard.json. The data is streamed twice (statistics, then contexts), with progress bars.

    \b
    Examples (offline, from an empty folder):
      decomp-hooks toy lm --out models/small-lm
      decomp-hooks decompose lm/small_spd --model models/small-lm --steps 50 --out runs/small-lm
      python -m pydoc json collections > text.txt    # any text; here stdlib docs, as the LM was trained on
      decomp-hooks dashboard runs/small-lm --model models/small-lm --data text.txt --out dash/
      decomp-hooks dashboard runs/small-lm --model models/small-lm --data text.txt --context-length 64 \\
          --sites 'model.layers.0.*' --components 0,3,5 --out dash/ --force
      decomp-hooks harvest runs/small-lm --model models/small-lm --data text.txt --tokens 100000 --out harvest/
      decomp-hooks dashboard runs/small-lm --model models/small-lm --harvest harvest/ --out dash/ --force
      decomp-hooks cluster runs/small-lm --model models/small-lm --data text.txt --out clusters/
      decomp-hooks dashboard runs/small-lm --model models/small-lm --harvest harvest/ --clusters clusters/ \\
          --out dash/ --force
    The sae-dashboard engine takes TransformerLens or Hugging Face GPT-2 models (e.g. a GPT-2 run, as in
    docs/dashboards.md) and runs on the cpu:
      decomp-hooks dashboard runs/gpt2-tiny --model models/tiny-gpt2 --data tokens.safetensors \\
          --engine sae-dashboard --sites transformer.h.0.mlp.c_proj --out dash-sd/
    """
    from decomp_hooks.clustering import ClusterError
    from decomp_hooks.dashboard import DashboardConfig, DashboardError, build_dashboards
    from decomp_hooks.data import DataError
    from decomp_hooks.store import StoreError
    from decomp_hooks.export import ExportError

    if harvest_dir is not None and (data_path is not None or engine != "native"):
        raise click.UsageError("--harvest replaces --data, with the native engine: pass one of them.")
    if data_path is None and harvest_dir is None:
        raise click.UsageError("pass --data (token ids or text) or --harvest DIR (a finished harvest of RUN_DIR).")
    check_out(out, force, run_dir, data_path, harvest_dir, clusters_path)
    dec, tokenizer = load_run(run_dir, model_dir, device)
    data = None if data_path is None else check_tokens(dec, load_tokens(data_path, tokenizer, context_length,
                                                                         batch_size), data_path)
    chosen = parse_components(components)
    try:
        if engine == "sae-dashboard":
            pages = sae_dashboard_pages(dec, data, out, list(sites) or None, chosen, tokenizer)
        else:
            cfg = DashboardConfig(n_examples=n_examples, batch_size=batch_size, max_batches=max_batches)
            pages = build_dashboards(dec, data, out, sites=list(sites) or None, components=chosen, tokenizer=tokenizer,
                                     config=cfg, model_name=model_name, dataset=str(data_path or harvest_dir),
                                     overwrite=force, progress=not no_progress, harvest=harvest_dir,
                                     clusters=clusters_path)
    except (DashboardError, ExportError, DataError, ClusterError, StoreError) as err:
        param = "--sites" if "pattern" in str(err) else "--components" if "components" in str(err) else None
        if param:
            raise click.BadParameter(str(err), param_hint=param) from None
        raise click.ClickException(str(err)) from None
    for site, page in pages.items():
        click.echo(f"{site}: {page}")
    click.echo(f"wrote {len(pages)} page(s) to {out}")


def sae_dashboard_pages(dec: Any, data: Any, out: Path, sites: list[str] | None, components: list[int] | None,
                        tokenizer: Any) -> dict[str, Path]:
    """sae-dashboard's feature-centric page per site (its features 2C: c and C + c are component c's ± parts), with
    the --model directory's tokenizer for the token strings."""
    import torch

    from decomp_hooks import store
    from decomp_hooks.dashboard.build import DashboardError, select_components
    from decomp_hooks.dashboard.sae_dashboard import hooked_transformer, render_with_sae_dashboard
    from decomp_hooks.export.format import dir_names
    from decomp_hooks.export.inputs import check_inputs
    from decomp_hooks.export.write import select_sites
    from decomp_hooks.train.preflight import vocab_size

    tokens = data if isinstance(data, torch.Tensor) else torch.cat(list(data))
    check_inputs(tokens, vocab_size(dec.cm.target), DashboardError)
    names = select_sites(dec, sites)
    tl = hooked_transformer(dec.model)
    if tl.tokenizer is None and tokenizer is not None:
        tl.set_tokenizer(tokenizer)
    files = dir_names(names)
    pages = {}
    with store.atomic_dir(out, overwrite=out.exists()) as tmp:
        for n in names:
            C = dec.cm.component(n).C
            chosen = select_components(C, components, n)
            features = None if components is None else [f for c in chosen for f in (c, C + c)]
            render_with_sae_dashboard(dec, n, tokens, tmp / f"{files[n]}.html", model=tl, features=features)
            pages[n] = out / f"{files[n]}.html"
    return pages
