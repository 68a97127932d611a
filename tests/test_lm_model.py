"""Loading a language model from config: local directories in each toolkit with the same logits as HF, named
assets, and errors that name the bad value (a typo'd path is never looked up on the hub)."""
from __future__ import annotations

import pytest
import torch

from decomp_hooks.config import ConfigError
from decomp_hooks.lm.model import ModelConfig, as_bridge, as_hooked_transformer, load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens")

IDS = torch.tensor([[464, 3290, 318, 257, 1332, 286, 262, 7071]])


def _save(model, tokenizer, folder):
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, n_positions=64))
    return _save(model, tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                                   rope_theta=5_000.0)
    return _save(transformers.LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("llama"))


def _hf_logits(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_transformers_loads_a_local_directory(gpt2_dir):
    loaded = load_model(ModelConfig(source=str(gpt2_dir)), "cpu")
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and not loaded.model.training
    assert loaded.context_length == 64 and loaded.name == str(gpt2_dir.resolve())
    assert loaded.tokenizer.eos_token_id == 50256
    half = load_model(ModelConfig(source=str(gpt2_dir), dtype="bfloat16"), "cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_nnsight_wraps_the_loaded_module(gpt2_dir):
    from nnsight import TransformersModel

    loaded = load_model(ModelConfig(source=str(gpt2_dir), toolkit="nnsight"), "cpu")
    assert isinstance(loaded.model, TransformersModel)
    with torch.no_grad(), loaded.model.trace(IDS):
        logits = loaded.model.output.logits.save()
    torch.testing.assert_close(logits, _hf_logits(gpt2_dir))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformer_lens_logits_agree_with_hf(arch, gpt2_dir, llama_dir):
    folder = {"gpt2": gpt2_dir, "llama": llama_dir}[arch]
    loaded = load_model(ModelConfig(source=str(folder), toolkit="transformer_lens"), "cpu")
    assert type(loaded.model).__name__ in ("HookedSAETransformer", "HookedTransformer")
    assert loaded.model.tokenizer is not None and loaded.context_length == 64
    with torch.no_grad():
        diff = (loaded.model(IDS) - _hf_logits(folder)).abs().max()
    assert diff < 1e-3, diff


def test_bridge_logits_agree_with_hf(llama_dir):
    loaded = load_model(ModelConfig(source=str(llama_dir), toolkit="bridge"), "cpu")
    assert "Bridge" in type(loaded.model).__name__
    with torch.no_grad():
        diff = (loaded.model(IDS) - _hf_logits(llama_dir)).abs().max()
    assert diff < 1e-4, diff


def test_unsupported_architectures_name_the_alternatives(tokenizer):
    cfg = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=128)
    with pytest.raises(ConfigError, match="'gpt_neox'.*'gpt2', 'llama'.*toolkit: bridge"):
        as_hooked_transformer(transformers.GPTNeoXForCausalLM(cfg), tokenizer, "neox", torch.device("cpu"))
    custom = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4))
    custom.config.model_type, custom.config.architectures = "made_up", ["MadeUpForCausalLM"]
    with pytest.raises(ConfigError, match="'made_up'.*toolkit: transformer_lens or transformers"):
        as_bridge(custom, tokenizer, "made-up", torch.device("cpu"))


def _no_hub(monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError(f"hub lookup {args}")

    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, fail)


@pytest.mark.parametrize("source", ["./no_such_model", "/nowhere/at/all", "models/gpt2/typo", "~/no_such_dir",
                                    "missing.gguf"])
def test_a_typo_in_a_path_names_it_without_a_hub_lookup(source, monkeypatch):
    _no_hub(monkeypatch)
    with pytest.raises(ConfigError, match=f"{source!r}: no such file or directory.*correct the path"):
        load_model(ModelConfig(source=source), "cpu")


def test_a_hub_id_offline_names_both_fixes(monkeypatch):
    _no_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'no-org/no-model'.*no local directory.*offline.*correct the path.*"
                                          "unset HF_HUB_OFFLINE.*pre-download"):
        load_model(ModelConfig(source="no-org/no-model"), "cpu")


def test_config_errors(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json.*save_pretrained"):
        load_model(ModelConfig(source=str(tmp_path)), "cpu")
    with pytest.raises(ConfigError, match="dtype='fp32'.*'bfloat16', 'float16', 'float32'"):
        load_model(ModelConfig(source=str(tmp_path), dtype="fp32"))
    with pytest.raises(ConfigError, match="toolkit='tl'.*'bridge', 'nnsight', 'transformer_lens', 'transformers'"):
        load_model(ModelConfig(source=str(tmp_path), toolkit="tl"))
    with pytest.raises(ConfigError, match="model.source is not set.*'small_lm', 'smollm2'"):
        load_model(ModelConfig())


def test_small_lm_asset_trains_on_first_use_and_loads_in_transformers_and_transformer_lens(tmp_path, monkeypatch):
    """The asset path end to end, with the recipe shrunk so that training on first use takes seconds."""
    from functools import partial

    from decomp_hooks.toy import lm as toy_lm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(toy_lm, "SmallLMConfig", partial(toy_lm.SmallLMConfig, vocab_size=300, d_model=32, d_mlp=64,
                                                         n_ctx=32))
    monkeypatch.setattr(toy_lm, "SmallLMTraining", partial(toy_lm.SmallLMTraining, steps=3, batch_size=4))
    hf = load_model(ModelConfig(source="small_lm"), "cpu")
    assert len(list((tmp_path / "decomp-hooks" / "small-lm").iterdir())) == 1
    tl = load_model(ModelConfig(source="small_lm", toolkit="transformer_lens"), "cpu")
    assert hf.name == "small_lm-s0" and hf.context_length == tl.context_length == 32
    ids = torch.tensor([hf.tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        assert (tl.model(ids) - hf.model(ids).logits).abs().max() < 1e-3
    with pytest.raises(ConfigError, match="toolkit: transformer_lens or transformers"):
        load_model(ModelConfig(source="small_lm", toolkit="bridge"), "cpu")


@pytest.mark.slow
def test_smollm2_asset_in_transformer_lens_and_bridge():
    pytest.importorskip("gguf")
    try:
        hf = load_model(ModelConfig(source="smollm2"), "cpu")
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    assert hf.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and hf.context_length == 8192
    ids = torch.tensor([hf.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        reference = hf.model(ids).logits
        tl = as_hooked_transformer(hf.model, hf.tokenizer, hf.name, torch.device("cpu"))
        assert (tl(ids) - reference).abs().max() < 1e-3
        bridge = as_bridge(hf.model, hf.tokenizer, hf.name, torch.device("cpu"))  # wraps the module: last
        assert (bridge(ids) - reference).abs().max() < 1e-3
