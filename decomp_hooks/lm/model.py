"""The model to decompose, from a local directory or `.gguf` file, a hub id or a named offline asset, handed over
as the object of the chosen toolkit: a transformers module, an nnsight `TransformersModel`, a TransformerLens
`HookedTransformer` (weights converted, not folded or centred) or a `TransformerBridge`.

A string that looks like a path is never looked up on the hub, so a typo is an error naming the path.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decomp_hooks.lm import config_error, load_tokenizer, looks_like_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class ModelConfig:
    """Which model to decompose and how to load it."""

    source: str | None = None  # a local directory or .gguf file, a hub id ("org/name"), or an asset: smollm2 | small_lm
    toolkit: str = "transformers"  # transformers | nnsight | transformer_lens | bridge
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 0  # only for assets trained on first use (small_lm)

    def __post_init__(self) -> None:
        """Refuse a bad value when the config is read, before anything loads: each error names it and the fix."""
        if self.source == "":
            raise config_error("model.source='' is empty; name a local model directory or .gguf file, a hub id or one "
                               f"of the offline assets {sorted(ASSETS)}.")
        torch_dtype(self.dtype)
        toolkit_loader(self.toolkit)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise config_error(f"model.device={self.device!r} is not a torch device; use cpu, cuda, cuda:1, ... or "
                                   "null (cuda if available, else cpu).") from None
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise config_error(f"model.seed={self.seed!r}: must be an integer in [0, 2³²).")


@dataclass
class LoadedModel:
    """A loaded model as its toolkit holds it, with its tokenizer, a name for provenance and its context length."""

    model: Any
    tokenizer: Any
    name: str
    context_length: int | None


def load_model(cfg: ModelConfig, device: torch.device | str | None = None, progress: bool = True) -> LoadedModel:
    """The configured model in eval mode on `device` (default: `cfg.device`, else cuda if available, else cpu);
    `progress` shows the bar of an asset trained on first use."""
    from decomp_hooks.run import resolve_device  # on use: the run module imports the config, which imports this one

    dtype = torch_dtype(cfg.dtype)
    wrap = toolkit_loader(cfg.toolkit)
    hf, tokenizer, name = load_hf(cfg.source, dtype, cfg.seed, progress)
    context = context_length(hf.config)
    model = wrap(hf, tokenizer, name, resolve_device(device or cfg.device))
    return LoadedModel(model, tokenizer, name, context or context_length(getattr(model, "cfg", None)))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named in a config."""
    if name not in DTYPES:
        raise config_error(f"model.dtype={name!r} is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def context_length(config: Any) -> int | None:
    """The longest context a model config allows (HF `max_position_embeddings` / `n_positions`, TL `n_ctx`)."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


# -- the HF module and tokenizer -----------------------------------------------------------------------------------


def load_hf(source: str | None, dtype: torch.dtype, seed: int = 0, progress: bool = True) -> tuple[Any, Any, str]:
    """An HF causal LM (eval mode, on cpu), its tokenizer and its name, from a named asset, a local path or a hub id."""
    if source is None:
        raise config_error(f"model.source is not set; name a local model directory, a hub id or one of the offline "
                           f"assets {sorted(ASSETS)}.")
    if source in ASSETS:
        return ASSETS[source](dtype, seed, progress)
    if looks_like_path(source, (".gguf",)):
        return from_local(source, dtype)
    return from_hub(source, dtype)


def _asset_hint(source: str) -> str:
    """' Did you mean ...?' when `source` is close to an offline asset's name (a typo rather than a hub id)."""
    close = difflib.get_close_matches(source, list(ASSETS), n=1, cutoff=0.7)
    return f" Did you mean the offline asset {close[0]!r}?" if close else ""


def from_local(source: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """A model saved with `save_pretrained` (config.json + weights + tokenizer) or a `.gguf` file (or a directory with
    exactly one)."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise config_error(f"model.source {source!r}: no such file or directory ({path}); correct the path.")
    if path.is_file() and path.suffix != ".gguf":
        raise config_error(f"model.source {source!r} is a file but not a .gguf; name the model's directory instead.")
    folder, gguf = (path.parent, path.name) if path.is_file() else (path, _single_gguf(path))
    hf, tokenizer = _from_pretrained(str(folder), dtype, source, **({"gguf_file": gguf} if gguf else {}))
    return hf, tokenizer, str(path)


def _single_gguf(folder: Path) -> str | None:
    """None for an HF model directory (config.json); else the name of its only `.gguf` file."""
    if (folder / "config.json").is_file():
        return None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise config_error(f"model.source {str(folder)!r} holds several .gguf files {ggufs}; name one of them.")
    raise config_error(f"model.source {str(folder)!r} is not a Hugging Face model directory: it has no config.json "
                       "(nor a .gguf file); write one with model.save_pretrained(dir) and "
                       "tokenizer.save_pretrained(dir).")


def from_hub(repo_id: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """A hub model by id; offline, only one already in the local HF cache."""
    if _hub_offline() and not _cached(repo_id):
        raise config_error(f"model.source {repo_id!r}: there is no local directory of that name and the hub is offline "
                           "(HF_HUB_OFFLINE=1) with no cached copy; correct the path (e.g. ./name for a directory), or "
                           f"unset HF_HUB_OFFLINE, or pre-download it (`hf download {repo_id}`).{_asset_hint(repo_id)}")
    hf, tokenizer = _from_pretrained(repo_id, dtype, repo_id)
    return hf, tokenizer, repo_id


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _from_pretrained(name: str, dtype: torch.dtype, source: str, **kwargs: Any) -> tuple[Any, Any]:
    """The causal LM and tokenizer saved under `name` (a directory or hub id; `gguf_file=` for GGUF), read in the
    order config, tokenizer, weights so that each failure is an error naming `source` (the config's value)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _register_toy_models()
    try:
        AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise config_error(f"model.source {source!r}: its model config cannot be read ({err}); point it at a model "
                           f"saved with model.save_pretrained(dir) or a GGUF file.{_asset_hint(source)}") from None
    tokenizer = load_tokenizer(name, "model.source", **kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise config_error(f"model.source {source!r}: the weights cannot be loaded ({err}); save them with "
                           "model.save_pretrained(dir).") from None
    return model.eval(), tokenizer


def _register_toy_models() -> None:
    """Import the toy language model's module, which registers its model type with transformers' Auto classes."""
    import importlib.util

    if importlib.util.find_spec("decomp_hooks.toy.lm") is not None:
        import decomp_hooks.toy.lm  # noqa: F401


def _smollm2(dtype: torch.dtype, seed: int, progress: bool) -> tuple[Any, Any, str]:
    from decomp_hooks.assets import smollm2

    model, tokenizer = smollm2(dtype)
    return model, tokenizer, SMOLLM2_NAME


def _small_lm(dtype: torch.dtype, seed: int, progress: bool) -> tuple[Any, Any, str]:
    from decomp_hooks.toy.lm import small_lm_dir

    model, tokenizer, _ = from_local(str(small_lm_dir(seed=seed, progress=progress)), dtype)
    return model, tokenizer, f"small_lm-s{seed}"


#: offline assets by name: (dtype, seed, progress) -> (HF module, tokenizer, name)
ASSETS: dict[str, Callable[[torch.dtype, int, bool], tuple[Any, Any, str]]] = {"smollm2": _smollm2, "small_lm": _small_lm}


# -- toolkits ------------------------------------------------------------------------------------------------------


def toolkit_loader(name: str) -> Callable[[Any, Any, str, torch.device], Any]:
    """The function that turns (HF module, tokenizer, name, device) into the toolkit's model."""
    if name not in TOOLKITS:
        raise config_error(f"model.toolkit={name!r} is not supported; use one of {sorted(TOOLKITS)}.")
    return TOOLKITS[name]


def as_transformers(hf: Any, tokenizer: Any, name: str, device: torch.device) -> Any:
    """The HF module itself."""
    return hf.to(device)


def as_nnsight(hf: Any, tokenizer: Any, name: str, device: torch.device) -> Any:
    """An nnsight `TransformersModel` around the loaded module (no hub call)."""
    from nnsight import TransformersModel

    return TransformersModel(hf.to(device), tokenizer=tokenizer)


def as_hooked_transformer(hf: Any, tokenizer: Any, name: str, device: torch.device) -> Any:
    """A TransformerLens `HookedTransformer` (sae-lens' `HookedSAETransformer` when installed) with the HF weights
    converted by the converter registered for the model type."""
    model_type = hf.config.model_type
    if model_type not in HOOKED_CONVERTERS:
        raise config_error(f"toolkit: transformer_lens cannot convert model type {model_type!r}; it supports "
                           f"{sorted(HOOKED_CONVERTERS)}. Use toolkit: bridge (TransformerBridge) or transformers.")
    tl = HOOKED_CONVERTERS[model_type](hf, tokenizer)
    tl.to(hf.dtype, print_details=False)
    return tl.to(device, print_details=False)


def as_bridge(hf: Any, tokenizer: Any, name: str, device: torch.device) -> Any:
    """A TransformerLens `TransformerBridge` (sae-lens' `SAETransformerBridge` when installed) wrapping the module."""
    from transformer_lens.model_bridge.sources.transformers import determine_architecture_from_hf_config

    try:
        determine_architecture_from_hf_config(hf.config)
    except ValueError:
        raise config_error(f"toolkit: bridge does not support model type {hf.config.model_type!r} "
                           f"({type(hf).__name__}); use toolkit: transformer_lens or transformers.") from None
    return _bridge_class().boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=str(device), dtype=hf.dtype)


def _bridge_class() -> Any:
    try:
        from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge
    return SAETransformerBridge


#: toolkit name -> (HF module, tokenizer, name, device) -> the toolkit's model
TOOLKITS: dict[str, Callable[[Any, Any, str, torch.device], Any]] = {
    "transformers": as_transformers, "nnsight": as_nnsight, "transformer_lens": as_hooked_transformer,
    "bridge": as_bridge}


# -- HF -> HookedTransformer converters ----------------------------------------------------------------------------


def gpt2_hooked(hf: Any, tokenizer: Any) -> Any:
    """An HF GPT-2 as a HookedTransformer, through the GPT-2 adapter's conversion."""
    from decomp_hooks.adapters.gpt2 import hooked_transformer

    tl = hooked_transformer(hf)
    tl.set_tokenizer(tokenizer)
    return tl


def llama_hooked(hf: Any, tokenizer: Any) -> Any:
    """An HF Llama-family model (`LlamaForCausalLM`, e.g. SmolLM2) as a HookedTransformer with unprocessed weights."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hc = hf.config
    if getattr(hc, "attention_bias", False) or getattr(hc, "mlp_bias", False):
        raise config_error("toolkit: transformer_lens drops the biases of a Llama model with attention_bias/mlp_bias; "
                           "use toolkit: bridge.")
    d_head = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    kv_heads = hc.num_key_value_heads if hc.num_key_value_heads != hc.num_attention_heads else None
    cfg = HookedTransformerConfig(
        d_model=hc.hidden_size, d_head=d_head, n_heads=hc.num_attention_heads, d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers, n_ctx=hc.max_position_embeddings, eps=hc.rms_norm_eps, d_vocab=hc.vocab_size,
        act_fn=hc.hidden_act, n_key_value_heads=kv_heads, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=d_head, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", dtype=hf.dtype, device="cpu", **_llama_rope(hc))
    return _hooked(cfg, tokenizer, convert_llama_weights(hf, cfg))


def _llama_rope(hc: Any) -> dict[str, Any]:
    """HookedTransformerConfig fields for the model's RoPE (default, or Llama 3's frequency scaling)."""
    rope = dict(getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields: dict[str, Any] = {"rotary_base": rope.get("rope_theta", getattr(hc, "rope_theta", 10_000.0))}
    if kind == "llama3":
        original_ctx = rope.get("original_max_position_embeddings", hc.max_position_embeddings)
        return fields | {"use_NTK_by_parts_rope": True, "NTK_by_parts_factor": rope.get("factor", 1.0),
                         "NTK_original_ctx_len": original_ctx,
                         "NTK_by_parts_low_freq_factor": rope.get("low_freq_factor", 1.0),
                         "NTK_by_parts_high_freq_factor": rope.get("high_freq_factor", 4.0)}
    if kind != "default":
        raise config_error(f"toolkit: transformer_lens does not implement rope_type {kind!r}; use toolkit: bridge.")
    return fields


def _hooked(cfg: Any, tokenizer: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """A HookedTransformer of `cfg` holding `state_dict` as is (no LayerNorm folding or weight centring)."""
    try:
        from sae_lens import HookedSAETransformer as Hooked
    except ImportError:
        from transformer_lens import HookedTransformer as Hooked

    model = Hooked(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.eval()


def small_lm_hooked(hf: Any, tokenizer: Any) -> Any:
    """The toy small LM as a HookedTransformer, through its own conversion."""
    from decomp_hooks.toy.lm import to_hooked_transformer

    return to_hooked_transformer(hf, tokenizer)


#: HF `model_type` -> (HF module, tokenizer) -> HookedTransformer
HOOKED_CONVERTERS: dict[str, Callable[[Any, Any], Any]] = {
    "gpt2": gpt2_hooked, "llama": llama_hooked, "decomp_simple_llama": small_lm_hooked}
