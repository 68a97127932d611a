"""Components rendered by sae-dashboard: the site exported as a ±-split SAE-Lens transcoder, fed to `SaeVisRunner`.

sae-dashboard 0.8 pins TransformerLens < 3 and transformers < 4.57, so it is installed with `--no-deps` next to
sae-lens 6 (plus `dataclasses-json`, `eindex-callum`, `matplotlib`). It needs a `HookedSAETransformer` and an SAE
whose hook matches `blocks.<layer>.`: decompositions of TransformerLens `HookedSAETransformer` models work directly,
HF GPT-2 models are converted (same weights, TransformerLens hook names). Feature c of the page is the positive part
of component c, feature C + c its negative part (the export's ±-split).

sae-dashboard assumes an SAE decodes back into its own hook: it maps decoder rows on `mlp.hook_pre/post` through
`W_out` and on `attn.hook_z` through `W_O` to reach the residual stream. A transcoder of an MLP's or attention's output
matrix reads there but already writes the residual stream (`U`, d_model). It is therefore handed over as the same
encoder with decoder rows `D = U W⁺` in the hook's own space, so that sae-dashboard's own map gives back
`D W = U` exactly (checked); activations are untouched. Sites whose output is not in the residual stream (an MLP's
input matrix) have no place in sae-dashboard's layout and are refused.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from decomp_hooks.adapters import adapter_for
from decomp_hooks.dashboard.build import DashboardError
from decomp_hooks.export import export_decomposition, load_sae


def available() -> bool:
    """Whether sae-dashboard can be imported."""
    try:
        import sae_dashboard  # noqa: F401
    except ImportError:
        return False
    return True


def hooked_transformer(model: Any) -> Any:
    """The model as a `HookedSAETransformer` (itself, or an HF GPT-2 converted by its adapter)."""
    tl = adapter_for(model).to_hooked_transformer(model)
    if tl is None:
        raise DashboardError(f"--engine sae-dashboard needs a TransformerLens HookedSAETransformer or an HF GPT-2 model; "
                             f"got {type(model).__name__}. Use the native engine for other models.")
    return tl


def render_with_sae_dashboard(dec: Any, site: str, tokens: torch.Tensor, out: str | Path, model: Any = None,
                              features: list[int] | None = None, minibatch_size_tokens: int = 64) -> Path:
    """Write sae-dashboard's feature-centric HTML for the site's components (default: all 2C ± features) to `out`."""
    if not available():
        raise DashboardError("sae-dashboard is not installed; install it next to sae-lens 6 with "
                             "`pip install --no-deps sae-dashboard==0.8.0 && pip install dataclasses-json eindex-callum`.")
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    tl = hooked_transformer(model if model is not None else dec.model)
    if tl.tokenizer is None:
        raise DashboardError("sae-dashboard shows token strings, and the model has no tokenizer; build the "
                             "HookedSAETransformer with tokenizer=... (e.g. decomp_hooks.assets.gpt2_tokenizer()).")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = export_decomposition(dec, Path(tmp) / "export", format="transcoder", sites=[site])
        sae = load_sae(dirs[site]).to_sae()
    hook = sae.cfg.metadata.hook_name
    if hook is None or not re.match(r"blocks\.\d+\.", hook):
        raise DashboardError(f"site {site!r} has no TransformerLens hook of the form blocks.<layer>.* ({hook!r}); "
                             "sae-dashboard cannot place it.")
    sae = residual_view(sae, tl, site)
    chosen = list(range(sae.cfg.d_sae)) if features is None else list(features)
    cfg = SaeVisConfig(hook_point=hook, features=chosen, minibatch_size_tokens=minibatch_size_tokens, device="cpu",
                       dtype="float32", verbose=False)
    data = SaeVisRunner(cfg).run(encoder=sae, model=tl, tokens=tokens.long())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_feature_centric_vis(sae_vis_data=data, filename=str(out))
    return out


def residual_view(sae: Any, tl: Any, site: str) -> Any:
    """The SAE as sae-dashboard reads it: unchanged where its decoder writes the hook's own space, else the same
    encoder with decoder rows `D = U W⁺` in the hook's space (W = `W_out` or flattened `W_O` of the layer)."""
    from sae_lens import SAE

    hook = sae.cfg.metadata.hook_name
    layer = int(hook.split(".")[1])
    if hook.endswith(("mlp.hook_pre", "mlp.hook_post")):
        W = tl.W_out[layer].detach()
    elif hook.endswith("attn.hook_z"):
        W = tl.W_O[layer].detach().flatten(0, 1)
    elif sae.W_dec.shape[1] == tl.cfg.d_model and sae.W_dec.shape[1] == sae.W_enc.shape[0]:
        return sae
    else:
        raise DashboardError(f"site {site!r} writes {sae.W_dec.shape[1]} dimensions outside the residual stream, and "
                             "sae-dashboard only places features with a residual-stream direction; use the native engine.")
    U = sae.W_dec.detach()
    if U.shape[1] != W.shape[1]:
        raise DashboardError(f"site {site!r} reads {hook} but writes d_out={U.shape[1]}, not d_model={W.shape[1]}: "
                             "sae-dashboard cannot place it; use the native engine.")
    D = U @ torch.linalg.pinv(W)
    err = ((D @ W - U).norm() / U.norm().clamp_min(1e-12)).item()
    if err > 1e-4:
        raise DashboardError(f"site {site!r}: its output directions are not reachable through {hook}'s map to the "
                             f"residual stream (relative error {err:.2g}); use the native engine.")
    cfg = {"d_in": sae.W_enc.shape[0], "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {**sae.cfg.metadata.to_dict(), "hook_name_out": None}, "architecture": "standard"}
    view = SAE.from_dict(cfg)
    view.load_state_dict({"W_enc": sae.W_enc.detach().clone(), "b_enc": sae.b_enc.detach().clone(), "W_dec": D,
                          "b_dec": torch.zeros(D.shape[1])})
    return view
