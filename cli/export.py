"""`decomp-hooks export RUN_DIR OUT_DIR`: a saved decomposition as SAE-Lens directories, one per site."""
from __future__ import annotations

from pathlib import Path

from typing import Any

import click

from decomp_hooks.cli.options import device_option

FORMAT_CHOICES = ["transcoder", "decomp_signed_transcoder", "signed"]
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv")


def decomposition_dir(run_dir: Path) -> Path:
    """RUN_DIR/decomposition, or RUN_DIR itself when it is a decomposition directory."""
    for candidate in (run_dir / "decomposition", run_dir):
        if (candidate / "decomposition.json").is_file():
            return candidate
    raise click.BadParameter(
        f"no decomposition in {str(run_dir)!r}: expected {str(run_dir / 'decomposition' / 'decomposition.json')!r} "
        "(a run directory) or decomposition.json in RUN_DIR itself (a decomposition directory).", param_hint="RUN_DIR")


def read_data(path: Path):
    """Token ids (or model inputs) from a safetensors file: the tensor named `tokens`, or its only tensor."""
    from decomp_hooks import store

    try:
        tensors = store.read_tensors(path)
    except store.StoreError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    if "tokens" in tensors:
        return tensors["tokens"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise click.BadParameter(f"{str(path)!r} holds tensors {sorted(tensors)}; name the input tensor 'tokens'.",
                             param_hint="--data")


def load_tokens(path: Path, tokenizer: Any, context_length: int, batch_size: int) -> Any:
    """Token ids from a safetensors file (tensor 'tokens'), or text files tokenized with the model's tokenizer."""
    if path.suffix == ".safetensors":
        return read_data(path)
    if path.is_dir() or path.suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise click.BadParameter(f"{str(path)!r} is text, and no tokenizer came with --model; pass token ids as a "
                                     "safetensors file, or a --model directory with a tokenizer.", param_hint="--data")
        from decomp_hooks.data import DataError
        from decomp_hooks.text import TokenBatches

        try:
            return TokenBatches(str(path), tokenizer, context_length=context_length, batch_size=batch_size)
        except DataError as err:
            raise click.BadParameter(str(err), param_hint="--data") from None
    raise click.BadParameter(f"{str(path)!r}: expected a .safetensors file of token ids or text "
                             f"({', '.join(TEXT_SUFFIXES)} files or a directory of them).", param_hint="--data")


def check_tokens(dec: Any, data: Any, path: Path) -> Any:
    """`data` read from --data, refused as a usage error naming the file when it is a tensor the decomposed model
    cannot read (`check_inputs`: no rows, NaN, floats or ids outside its vocabulary); text is checked batch by batch
    later."""
    from decomp_hooks.export.inputs import check_inputs
    from decomp_hooks.train.preflight import vocab_size

    check_inputs(data, vocab_size(dec.cm.target),
                 lambda message: click.BadParameter(f"{str(path)!r}: {message}", param_hint="--data"))
    return data


def load_model(path: Path):
    """A local Hugging Face causal LM directory (the small LM of `toy lm` included), and its tokenizer if it has one."""
    import transformers

    from decomp_hooks.toy.lm import register

    register()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"cannot load a causal LM from {str(path)!r}: {err}", param_hint="--model") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="transcoder", show_default=True,
              help="transcoder: exact ±-split (W_enc=[V,-V], W_dec=[U;-U]) that stock SAE-Lens and sae-dashboard load; "
                   "decomp_signed_transcoder (alias signed): signed component activations; sae-lens loads it after "
                   "`decomp_hooks.export.register()` (load_sae(DIR).to_sae() registers it itself).")
@click.option("--sites", "sites", multiple=True, metavar="PATTERN",
              help="fnmatch pattern over site names, e.g. 'blocks.0.mlp.*' (repeatable; default: every site that "
                   "reads activations).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face model directory of a language-model run (see Models below); toy runs need "
                   "none.")
@click.option("--model-name", default=None, help="metadata.model_name (default: the model's own name).")
@click.option("--data", "data_file", type=click.Path(exists=True, path_type=Path), default=None,
              help="Evaluation inputs: a safetensors file (tensor 'tokens' [n, seq] for LMs), or text files / a "
                   "directory of them tokenized with --model's tokenizer; writes sparsity.safetensors and, for token "
                   "ids, neuronpedia.json per site.")
@click.option("--samples", type=click.IntRange(min=0), default=4096, show_default=True,
              help="For toy runs without --data: inputs drawn from the toy's own distribution for sparsity "
                   "(0 writes none).")
@click.option("--ci-gated", is_flag=True, help="decomp_signed_transcoder only: store the CI function and gate the "
                                                 "activations by causal importance.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size over --data.")
@click.option("--context-length", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per sequence for text data.")
@device_option
def export_command(run_dir: Path, out_dir: Path, fmt: str, sites: tuple[str, ...], force: bool, model_dir: Path | None,
                   model_name: str | None, data_file: Path | None, samples: int, ci_gated: bool, batch_size: int,
                   context_length: int, device: Any) -> None:
    """Export the decomposition in RUN_DIR (a run directory with decomposition/ inside, or a decomposition directory)
    to OUT_DIR: one SAE-Lens directory per site (cfg.json, sae_weights.safetensors), named after the site, plus an
    export.json index. The write is atomic: OUT_DIR appears complete or not at all.

    Each SAE computes decode(encode(x)) = x V U + b, the site output with all components on and without the delta
    component; metadata.delta_weight_rel_norm = ||W - (VU)^T|| / ||W|| is printed per site.

    \b
    Models: toy runs find their target in RUN_DIR/target. For a language-model
    run pass --model DIR, a local Hugging Face model directory loaded with
    transformers.AutoModelForCausalLM.from_pretrained(DIR) (plus its tokenizer,
    if it has one, for --data text and the token strings of neuronpedia.json);
    its weights must be the decomposed ones (checked by fingerprint). Without
    --model, a run whose config has a `model:` section (e.g. `decompose
    lm/small_vpd`) loads that model. Runs on TransformerLens models export from
    Python: dec.export(...).

    \b
    Examples:
      decomp-hooks export runs/tms_5-2-s0 exports/tms
      decomp-hooks export runs/tms_5-2-s0 exports/tms --format signed \\
          --ci-gated --samples 10000 --force
      # runs/tms_5-2-s0 is what `decomp-hooks decompose tms_5-2` writes. A language-model run, offline:
      decomp-hooks toy lm --out models/small-lm
      decomp-hooks decompose lm/small_spd --model models/small-lm --steps 50 --out runs/small-lm
      python -m pydoc json collections > text.txt    # any text; here stdlib docs, as the LM was trained on
      decomp-hooks export runs/small-lm exports/small-lm --model models/small-lm \\
          --model-name small-lm --sites 'model.layers.0.*' --sites '*.down_proj' \\
          --data text.txt --batch-size 16
    """
    import warnings

    from decomp_hooks.cli.options import check_out
    from decomp_hooks.cli.runs import load_run
    from decomp_hooks.data import DataError
    from decomp_hooks.export import ExportError, load_export

    if ci_gated and fmt == "transcoder":
        raise click.BadParameter("--ci-gated needs --format decomp_signed_transcoder (or signed).", param_hint="--ci-gated")
    check_out(out_dir, force, run_dir)
    dec, tokenizer = load_run(run_dir, model_dir, device)
    data = None
    if data_file is not None:
        data = check_tokens(dec, load_tokens(data_file, tokenizer, context_length, batch_size), data_file)
    elif samples > 0:
        from decomp_hooks.toy import ToyModel, toy_sampler

        if isinstance(dec.model, ToyModel):
            data = toy_sampler(dec.model, dec.device)(samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dirs = dec.export(out_dir, format=fmt, sites=list(sites) or None, data=data, overwrite=force,
                              ci_gated=ci_gated, model_name=model_name, tokenizer=tokenizer, batch_size=batch_size,
                              provenance={"source_path": str(decomposition_dir(run_dir))})
        except (ExportError, DataError) as err:
            if "pattern" in str(err):
                raise click.BadParameter(str(err), param_hint="--sites") from None
            raise click.ClickException(str(err)) from None
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    saes = load_export(out_dir)
    for site, d in dirs.items():
        md = saes[site].metadata
        rel = md.get("delta_weight_rel_norm")
        hooks = f"{md.get('hook_name')} -> {md.get('hook_name_out')}" if md.get("hook_name") else \
            f"hf {md.get('hf_hook_name')}" if md.get("hf_hook_name") else "no hook names"
        rel = "n/a" if rel is None else f"{rel:.4g}"
        click.echo(f"{site}: {d}  d_sae={saes[site].d_sae}  |dW|/|W|={rel}  {hooks}"
                   f"{'  +sparsity' if saes[site].sparsity is not None else ''}")
    click.echo(f"exported {len(dirs)} site(s) as {fmt} to {out_dir} (the delta component is not part of the export)")
