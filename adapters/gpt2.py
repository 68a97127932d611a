"""Hugging Face GPT-2 seen as TransformerLens: the TL hook names of its sites and the converted model.

TransformerLens loads the same GPT-2 weights as a `HookedTransformer`, so a site of an HF GPT-2 (`h.0.mlp.c_fc`)
has TransformerLens hook points (`blocks.0.mlp.hook_in` -> `blocks.0.mlp.hook_pre`) and its export can be spliced
into a `HookedSAETransformer`; sae-dashboard needs that converted model.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

from torch import nn

from decomp_hooks.adapters.base import HookNames
from decomp_hooks.sites import Site

LM_CLASS = "GPT2LMHeadModel"
CLASSES = (LM_CLASS, "GPT2Model")
_SITE = re.compile(r"(?:transformer\.)?h\.(\d+)\.(mlp\.c_fc|mlp\.c_proj|attn\.c_proj)")
_HOOKS = {"mlp.c_fc": ("mlp.hook_in", "mlp.hook_pre", "none"), "mlp.c_proj": ("mlp.hook_post", "hook_mlp_out", "none"),
          "attn.c_proj": ("attn.hook_z", "hook_attn_out", "hook_z")}


def is_gpt2(module: nn.Module, lm: bool = False) -> bool:
    """Whether the module is a transformers GPT-2 (with `lm`: a `GPT2LMHeadModel`), recognised by class name so that
    transformers need not be imported."""
    return type(module).__name__ in ((LM_CLASS,) if lm else CLASSES)


def add_hook_names(hooks: HookNames, site: Site) -> None:
    """Fill in the TransformerLens hooks of a GPT-2 site where the converted model has one pair for it."""
    if site.kind.inserted:
        return
    if site.module == "lm_head":
        hooks.hook_name, hooks.hook_name_out = "unembed.hook_in", "unembed.hook_out"
        return
    m = _SITE.fullmatch(site.module)
    if m:
        hook_in, hook_out, reshape = _HOOKS[m.group(2)]
        hooks.hook_name, hooks.hook_name_out = f"blocks.{m.group(1)}.{hook_in}", f"blocks.{m.group(1)}.{hook_out}"
        hooks.reshape_activations = reshape


def hooked_transformer(model: nn.Module) -> Any:
    """A `GPT2LMHeadModel` as a `HookedSAETransformer` with its weights unprocessed (no folding or centring)."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hc = model.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(d_model=hc.n_embd, d_head=hc.n_embd // hc.n_head, n_heads=hc.n_head,
                                      d_mlp=hc.n_inner or 4 * hc.n_embd, n_layers=hc.n_layer, n_ctx=hc.n_positions,
                                      eps=hc.layer_norm_epsilon, d_vocab=hc.vocab_size, act_fn="gelu_new",
                                      normalization_type="LN", original_architecture="GPT2LMHeadModel", device="cpu")
        tl = HookedSAETransformer(cfg, tokenizer=getattr(model, "tokenizer", None))
        tl.load_and_process_state_dict(convert_gpt2_weights(model, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return tl.eval()
