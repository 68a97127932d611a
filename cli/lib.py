"""`decomp-hooks lib CONFIG.yaml`: Local Interaction Basis and interaction graph of a toy target, with plots."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from decomp_hooks.cli.options import device_option

#: training steps of the two timed runs whose difference gives the target's training speed (fixed costs cancel)
TIMING_STEPS = (5, 25)


def load_target(cfg, device: Any, progress: bool, out: Path):
    """The model, its LIB data and, for modular addition, the test tokens and accuracy metric."""
    from decomp_hooks.toy import load_toy, toy_sampler
    from decomp_hooks.toy.modadd import ModAddTransformer, modadd_dataset

    t = cfg.target
    model = load_toy(t.path) if t.path is not None else train_target(t, device, progress, out / "target")
    if isinstance(model, ModAddTransformer):
        p = model.config.p
        train_x, _, test_x, _ = modadd_dataset(p)
        metric = lambda out, tokens: (out[:, -1].argmax(-1) == (tokens[:, 0] + tokens[:, 1]) % p).float().mean()  # noqa: E731
        return model, train_x, test_x[: cfg.ablation_samples], metric
    if cfg.lib.n_samples is None:
        raise click.BadParameter("a sampled toy needs lib.n_samples (how many inputs LIB draws).", param_hint="CONFIG")
    return model, toy_sampler(model), None, None


def train_target(t, device: Any, progress: bool, saved_to: Path) -> Any:
    """The modular-addition target trained on the spot, after saying up front what runs, until when and how long it
    can take (hours on a CPU), from its speed measured here."""
    from decomp_hooks.progress import duration
    from decomp_hooks.toy.modadd import train_modadd

    click.echo(f"training the modular-addition transformer first (seed {t.seed}, lr {t.lr}, on {device}): full-batch "
               f"AdamW until test accuracy ≥ {t.stop_accuracy} (checked every 100 steps), at most {t.steps} steps; "
               "timing a few steps ...")
    rate = steps_per_second(t, device)
    click.echo(f"{rate:.1f} steps/s here: the {t.steps}-step cap takes {duration(t.steps / rate)}; training stops "
               f"sooner once the accuracy is reached. The target is saved with the results, to {saved_to}: set "
               "target.path to it to skip this next time.")
    model, info = train_modadd(seed=t.seed, lr=t.lr, max_steps=t.steps, stop_accuracy=t.stop_accuracy, device=device,
                               progress=progress)
    click.echo(f"trained {info['steps']} steps: test accuracy {info['test_accuracy']:.4f}")
    return model


def steps_per_second(t, device: Any) -> float:
    """Training steps per second of the target on `device`: two short runs timed, their difference over steps."""
    from decomp_hooks.toy.modadd import train_modadd

    seconds = []
    for steps in TIMING_STEPS:
        start = time.perf_counter()
        train_modadd(seed=t.seed, lr=t.lr, max_steps=steps, stop_accuracy=2.0, eval_every=steps + 1, device=device,
                     progress=False)
        seconds.append(time.perf_counter() - start)
    return (TIMING_STEPS[1] - TIMING_STEPS[0]) / max(seconds[1] - seconds[0], 1e-6)


@click.command("lib")
@click.argument("config", metavar="CONFIG")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory (default: runs/<config name>-<basis>).")
@click.option("--basis", type=click.Choice(["lib", "pca"]), default=None, help="Override lib.basis (pca = the baseline).")
@device_option
@click.option("--no-ablation", is_flag=True, help="Skip the node/edge ablation curves.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def lib_command(config: str, out: Path | None, basis: str | None, device: Any, no_ablation: bool, force: bool,
                no_progress: bool) -> None:
    """Build the LIB (or PCA) bases and interaction graph of the target in CONFIG (see lib_modadd).

    Writes OUT/lib (safetensors + JSON, reload with decomp_hooks.load_lib), graph.json, graph.png and, for modular
    addition, ablation.json + ablation.png (test accuracy vs kept directions / edges). A target that CONFIG trains on
    the spot (lib_modadd's grokking transformer: up to 60,000 steps, hours on a CPU) is timed first, with the time it
    can take printed before it starts, and saved to OUT/target for target.path in later runs.

    Example: decomp-hooks lib lib_modadd --out runs/lib-modadd
    """
    import decomp_hooks as dh
    from decomp_hooks import store
    from decomp_hooks.config import ConfigError, config_path
    from decomp_hooks.lib.ablation import ablation_curves
    from decomp_hooks.cli.options import check_out
    from decomp_hooks.lib.config import load_lib_run_config
    from decomp_hooks.lib.graph import graph_dict, plot_ablation, plot_graph
    from decomp_hooks.toy import save_toy

    try:
        cfg = load_lib_run_config(config)
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="CONFIG") from None
    basis = basis or cfg.lib.basis
    out = out or Path("runs") / f"{Path(config).stem}-{basis}"
    check_out(out, force, config_path(config))
    progress = not no_progress
    try:
        model, data, test, metric = load_target(cfg, device, progress, out)
        result = dh.local_interaction_basis(model, data, config=cfg.lib, basis=basis, device=str(device),
                                            progress=progress)
        curves = None
        if cfg.ablation and not no_ablation and metric is not None:
            curves = ablation_curves(result, model, test, metric, batch_size=cfg.lib.batch_size, progress=progress)
    except ValueError as err:  # ConfigError, NodeError, DataError, StoreError
        raise click.ClickException(str(err)) from None
    with store.atomic_dir(out, overwrite=out.exists()) as tmp:
        if cfg.target.path is None:
            save_toy(model, tmp / "target", seed=cfg.target.seed)
        result.save(tmp / "lib")
        graph = graph_dict(result, top_k=cfg.plot_top_k)
        store.write_json(tmp / "graph.json", graph)
        plot_graph(result, tmp / "graph.png", top_k=cfg.plot_top_k)
        if curves is not None:
            store.write_json(tmp / "ablation.json", curves.to_dict())
            plot_ablation(curves, tmp / "ablation.png", label="test accuracy")
    click.echo(f"{basis.upper()} directions per node layer: {result.sizes()}")
    for pair, m in graph["mass"].items():
        need = f", edges for Δscore ≤ 0.001: {curves.required[pair]}" if curves and pair in curves.required else ""
        click.echo(f"{pair}: edges holding 90 % / 99 % of the mass: {m['edges_90']} / {m['edges_99']}{need}")
    if curves is not None:
        click.echo(f"unablated test accuracy {curves.base:.4f}; kept directions for ≥ 99 %: "
                   + ", ".join(f"{n}: {curves.required[n]}" for n in curves.nodes))
    click.echo(f"output directory: {out}")
