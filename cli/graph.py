"""`decomp-hooks graph RUN_DIR --prompt ... --out DIR`: the attribution graph of a run's components on one prompt."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.runs import load_run
from decomp_hooks.cli.options import NumberRange, check_out, device_option

#: the option a GraphError is about, by the first word of its message
PARAMS = {"prompt": "--prompt", "target": "--target", "slug": "--slug"}


def read_prompt(prompt: str, dec: Any) -> Any:
    """The prompt as text, or, for a model without a vocabulary (a toy), as a comma-separated input vector."""
    import torch

    from decomp_hooks.train.preflight import vocab_size

    if vocab_size(dec.model) is not None:
        return prompt
    try:
        return torch.tensor([float(v) for v in prompt.split(",")])
    except ValueError:
        raise click.BadParameter(f"{prompt!r}: this model reads a vector; give its entries separated by commas, "
                                 "e.g. 0,0,1,0,0.", param_hint="--prompt") from None


def read_targets(targets: tuple[str, ...], dec: Any) -> Any:
    """Token strings for a language model, output indices for a toy; None (the top prediction) when none is given."""
    from decomp_hooks.train.preflight import vocab_size

    if not targets:
        return None
    if vocab_size(dec.model) is not None:
        return list(targets)
    try:
        return [int(t) for t in targets]
    except ValueError:
        raise click.BadParameter(f"{targets}: this model's outputs are indices; give integers.",
                                 param_hint="--target") from None


@click.command("graph")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="The prompt (text), or for a toy run its input vector, e.g. 0,0,1,0,0.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (written atomically).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face model directory of a language-model run (default: the model its config names).")
@click.option("--target", "targets", multiple=True, metavar="TOKEN",
              help="Output to explain at the last position: one token (repeatable; toys: an output index). Default: "
                   "the top prediction.")
@click.option("--threshold", type=NumberRange(0.0, 1.0, max_open=True), default=0.1, show_default=True,
              help="Components with causal importance above this are nodes.")
@click.option("--node-threshold", type=NumberRange(0.0, 1.0), default=0.8, show_default=True,
              help="Pruning keeps the nodes holding this share of the influence on the targets.")
@click.option("--edge-threshold", type=NumberRange(0.0, 1.0), default=0.98, show_default=True,
              help="... then the edges holding this share of the edge influence.")
@click.option("--min-influence-kept", type=NumberRange(0.0, 1.0), default=0.8, show_default=True,
              help="Both thresholds are raised toward 1 until the pruned graph keeps this share of the influence.")
@click.option("--max-nodes", type=click.IntRange(min=1), default=2048, show_default=True,
              help="At most this many component nodes (the largest CI x |activation| first).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Targets per backward pass.")
@click.option("--slug", default=None, help="File name of the graph (default: made from the prompt).")
@click.option("--model-name", default=None, help="metadata.scan (default: the run's model name).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@device_option
def graph_command(run_dir: Path, prompt: str, out: Path, model_dir: Path | None, targets: tuple[str, ...],
                  threshold: float, node_threshold: float, edge_threshold: float, min_influence_kept: float,
                  max_nodes: int, batch_size: int, slug: str | None, model_name: str | None, force: bool,
                  device: Any) -> None:
    """The attribution graph of the components in RUN_DIR on one prompt: nodes are the components with causal
    importance above --threshold at each position, the token embeddings and the target outputs; edges are
    direct-path attributions (docs/graphs.md), pruned to those carrying the influence on the targets. Writes
    OUT/<slug>.json (the format Neuronpedia's graph viewer and circuit-tracer's local server read),
    OUT/graph-metadata.json (circuit-tracer's list of graphs) and OUT/<slug>.html (an offline view).

    \b
    Examples (offline):
      decomp-hooks graph runs/lm_small/vpd-s0 --prompt "the cat sat on the" --out graphs/cat
      decomp-hooks graph runs/small-lm --model models/small-lm --prompt "once upon a time" \\
          --target " there" --threshold 0.2 --out graphs/once --force
      decomp-hooks graph runs/tms_5-2-s0 --prompt 0,0,1,0,0 --out graphs/tms
    """
    from decomp_hooks.graph import GraphError

    check_out(out, force, run_dir)
    dec, tokenizer = load_run(run_dir, model_dir, device)
    try:
        graph = dec.attribution_graph(read_prompt(prompt, dec), target=read_targets(targets, dec), threshold=threshold,
                                      node_threshold=node_threshold, edge_threshold=edge_threshold,
                                      min_influence_kept=min_influence_kept, max_nodes=max_nodes,
                                      batch_size=batch_size, tokenizer=tokenizer, slug=slug, model_name=model_name)
        paths = graph.save(out, overwrite=force)
    except GraphError as err:
        param = PARAMS.get(re.match(r"\w*", str(err)).group())
        if param:
            raise click.BadParameter(str(err), param_hint=param) from None
        raise click.ClickException(str(err)) from None
    click.echo(graph.summary())
    click.echo(f"wrote {paths['json']} and {paths['html']}")
