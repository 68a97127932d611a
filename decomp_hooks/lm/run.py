"""A language-model run from a config's `model:` and `data:` sections: load the model in its toolkit, tokenise the
text (held-out rows for evaluation), decompose, and write the evaluation report (docs/lm.md)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from decomp_hooks import distributed
from decomp_hooks.config import ConfigError, DecomposeConfig
from decomp_hooks.decomposition import Decomposition


def main_first(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args)` on rank 0 first, then on the other ranks: whatever it trains or caches on first use (the small
    LM, the token cache) is written once and read by the rest."""
    result = fn(*args, **kwargs) if distributed.is_main_process() else None
    distributed.barrier()
    return result if distributed.is_main_process() else fn(*args, **kwargs)


def run_lm(cfg: DecomposeConfig, out: Path, steps: int | None, device: Any, seed: int, resume: bool,
           progress: bool, fit_context: bool = False) -> Decomposition:
    """Decompose the config's language model on its text (evaluated on held-out rows) into run directory `out`.
    `fit_context` (the default recipe, which the user did not write) shortens rows to a shorter model context
    instead of refusing."""
    import decomp_hooks as dh
    from decomp_hooks.defaults import warn_if_builtin
    from decomp_hooks.lm.data import token_data
    from decomp_hooks.lm.model import load_model
    from decomp_hooks.run import resolve_device

    if cfg.data is None or (cfg.data.source is None and not cfg.data.files):
        raise ConfigError("the config has a `model:` section but no text: set `data: {source: ...}` (a dataset name, "
                          "local files, or stdlib_docstrings) or pass --data.")
    if cfg.data.eval_split is None and cfg.data.eval_rows < 1:
        raise ConfigError(f"data.eval_rows={cfg.data.eval_rows}: a language-model run is evaluated on held-out rows; "
                          "hold out at least 1 (or name a data.eval_split).")
    _, dev = distributed.setup(resolve_device(device or cfg.model.device))
    loaded = main_first(load_model, cfg.model, dev, progress)
    if loaded.context_length is not None and cfg.data.context_length > loaded.context_length and fit_context:
        cfg.data = dataclasses.replace(cfg.data, context_length=loaded.context_length)
    if loaded.context_length is not None and cfg.data.context_length > loaded.context_length:
        raise ConfigError(f"data.context_length={cfg.data.context_length} exceeds the model's context "
                          f"{loaded.context_length}; use data.context_length ≤ {loaded.context_length}.")
    warn_if_builtin(cfg.data)
    tokens = main_first(token_data, cfg.data, loaded.tokenizer, cfg.train.batch_size, progress)
    dec = dh.decompose(loaded.model, tokens.train, config=cfg, steps=steps, device=dev, seed=seed, out_dir=out,
                       resume=resume, progress=progress, eval_data=tokens.eval)
    dec.provenance.update({"model": loaded.name, "data": tokens.info})
    return dec


LEGEND = """\
On held-out text. KL: mean KL(target || masked model) per token, nats. CE: next-token cross-entropy. ΔCE: CE minus the
target's. unrecovered: ΔCE over zero_masked's ΔCE (0%: as good as the target; 100%: as bad as every component off).
Masks: ci_masked (each component scaled by its CI), unmasked (all on), stoch_masked (random between CI and 1),
rounded_masked (on where CI > 0), random_masked (uniform random), zero_masked (all off), adversarial (the worst masks
between CI and 1 a PGD adversary finds). CI-L0: components per token with CI above ci_alive_threshold; alive:
components above it at some held-out token. A language model has no ground truth: no pass/fail; compare seeds,
methods and the masks (ci_masked and stoch_masked near unmasked, a small CI-L0, a low adversarial KL are better)."""
FILES = ("run directory {out}: eval.json (these figures), training_curves.png (losses and L0 over steps), eval_kl.png "
         "(KL per mask), sites.png (C, L0 and alive per site), decomposition/ (safetensors + JSON, reload with "
         "decomp_hooks.load), metrics.jsonl, config.yaml, checkpoints/")


def finish_lm(dec: Decomposition, out: Path) -> str:
    """Write `eval.json` and the PNG plots into `out`; the evaluation table to print."""
    from decomp_hooks.lm.report import report_table, write_report

    return f"{report_table(write_report(dec, out))}\n\n{LEGEND}\n{FILES.format(out=out)}"
