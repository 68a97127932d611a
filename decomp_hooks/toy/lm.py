"""A small Llama-style causal language model: a CPU-trainable ground truth for language-model decompositions.

Two pre-norm blocks of RoPE attention and a plain (non-gated) GELU MLP with tied embeddings, like the VPD paper's
LlamaSimpleMLP but small. It is a Hugging Face model (`AutoModelForCausalLM.from_pretrained` loads it once this module
is imported), trained with a byte-level BPE tokenizer on the standard library's docstrings, cached on first use, and
convertible to a TransformerLens `HookedTransformer` with the same logits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerFast
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from decomp_hooks import store
from decomp_hooks.progress import progress_bar
from decomp_hooks.text import chunk_tokens, stdlib_docstrings, token_stream

EOS = "<|endoftext|>"

# -- the Hugging Face model ---------------------------------------------------------------------------------------


class SimpleLlamaConfig(PreTrainedConfig):
    """Shape of a `SimpleLlamaForCausalLM`, under Llama's field names; saved as `config.json`."""

    model_type = "decomp_simple_llama"

    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must split into num_attention_heads="
                             f"{self.num_attention_heads} heads of even size (RoPE rotates pairs); change either.")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


class SimpleLlamaRMSNorm(nn.Module):
    """RMSNorm with a learned gain: `x / sqrt(mean(x²) + eps) * weight`."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_cos_sin(n_pos: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """RoPE tables `[n_pos, head_dim]` in Hugging Face Llama's convention (frequencies repeated over both halves)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension's halves (Llama's `rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class SimpleLlamaAttention(nn.Module):
    """Causal multi-head attention with RoPE on queries and keys; no biases."""

    def __init__(self, config: SimpleLlamaConfig) -> None:
        super().__init__()
        d, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(z.transpose(1, 2).reshape(b, t, -1))


class SimpleLlamaMLP(nn.Module):
    """`down_proj(GELU(c_fc(x)))` with the exact (erf) GELU; no gate, no biases."""

    def __init__(self, config: SimpleLlamaConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.c_fc(x)))


class SimpleLlamaDecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `+ mlp(norm(·))`."""

    def __init__(self, config: SimpleLlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = SimpleLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SimpleLlamaAttention(config)
        self.post_attention_layernorm = SimpleLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SimpleLlamaMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class SimpleLlamaPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hugging Face plumbing shared by the base model and the LM."""

    config_class = SimpleLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["SimpleLlamaDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, SimpleLlamaRMSNorm):
            init.ones_(module.weight)


def attention_mask_4d(attention_mask: Tensor | None, t: int) -> Tensor | None:
    """None when every token is real (SDPA's fast causal path); else a `[B, 1, T, T]` causal ∧ key-padding mask that
    keeps the diagonal, so padded queries stay finite."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask[:, None, None, :].bool()
    return causal & (keys | torch.eye(t, dtype=torch.bool, device=attention_mask.device))


class SimpleLlamaModel(SimpleLlamaPreTrainedModel):
    """Embedding, decoder layers and final RMSNorm: token ids to the final residual stream."""

    def __init__(self, config: SimpleLlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SimpleLlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = SimpleLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"input of {t} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}; pass at most that many tokens.")
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(t, self.config.head_dim, self.config.rope_theta, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = attention_mask_4d(attention_mask, t)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class SimpleLlamaForCausalLM(SimpleLlamaPreTrainedModel, GenerationMixin):
    """The small LM: `SimpleLlamaModel` plus an unembedding tied to the token embedding."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SimpleLlamaConfig) -> None:
        super().__init__(config)
        self.model = SimpleLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                **kwargs: Any) -> CausalLMOutput:
        """Logits `[B, T, vocab]`; with `labels` (usually the input ids) also the next-token cross-entropy, ignoring
        -100. Other keyword arguments (cache, position ids) are ignored: every call recomputes all tokens."""
        logits = self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve `model_type="decomp_simple_llama"`; safe to call again."""
    AutoConfig.register(SimpleLlamaConfig.model_type, SimpleLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SimpleLlamaConfig, SimpleLlamaForCausalLM, exist_ok=True)


register()


# -- tokenizer, corpus and training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmallLMConfig:
    """Architecture of the small LM; `n_ctx` is also the training context length."""

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    rope_base: float = 10000.0

    def hf_config(self) -> SimpleLlamaConfig:
        """The Hugging Face config of this shape (token id 0 is `<|endoftext|>`, as `train_tokenizer` makes it)."""
        return SimpleLlamaConfig(vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
                                 num_attention_heads=self.n_heads, intermediate_size=self.d_mlp,
                                 max_position_embeddings=self.n_ctx, rope_theta=self.rope_base)


@dataclass(frozen=True)
class SmallLMTraining:
    """Training recipe: AdamW with linear warmup then cosine decay to `lr * final_lr_fraction`, on random
    `n_ctx`-token windows of the training documents; `eval_fraction` of the documents are held out."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    eval_fraction: float = 0.05
    min_chars: int = 50


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on lower-cased `texts` with `<|endoftext|>` (id 0) as BOS, EOS and padding; the same
    texts always give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges; use more than {len(alphabet) + 1}.")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by a hash of each document's text: the split does not depend on the seed or on the order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1, e.g. 0.05.")
    held = [int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) < eval_fraction * 16**8 for d in docs]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def token_rows(docs: list[str], tokenizer: PreTrainedTokenizerFast, n_ctx: int) -> Tensor:
    """The documents joined by EOS and cut into `[n_rows, n_ctx]` consecutive tokens (the tail is dropped)."""
    batches = list(chunk_tokens(token_stream(docs, tokenizer), n_ctx, 1))
    if not batches:
        raise ValueError(f"{len(docs)} documents give fewer than n_ctx={n_ctx} tokens; pass more text or a "
                         "smaller n_ctx.")
    return torch.cat(batches)


def unigram_entropy(rows: Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies in `rows`: the loss of the best model that ignores context."""
    p = torch.bincount(rows.flatten(), minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def mean_cross_entropy(model: SimpleLlamaForCausalLM, rows: Tensor, batch_size: int) -> float:
    """Next-token cross-entropy (nats) of `model` over every row, averaged per predicted token."""
    total = sum(float(model(b, labels=b).loss) * b.shape[0] for b in rows.split(batch_size))
    return total / rows.shape[0]


def _sample_rows(rows: Tensor, n: int, seed: int) -> Tensor:
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


def _lr_factor(step: int, training: SmallLMTraining) -> float:
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
    return training.final_lr_fraction + (1 - training.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, training: SmallLMTraining) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    gains = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": training.weight_decay}, {"params": gains, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=training.lr, betas=(0.9, 0.95))


def fit_lm(model: SimpleLlamaForCausalLM, rows: Tensor, training: SmallLMTraining,
           progress: bool = True) -> list[float]:
    """Train `model` in place on random rows of `rows` with the recipe's schedule; returns the loss of every step."""
    gen = torch.Generator().manual_seed(training.seed)
    opt = _optimizer(model, training)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, training))
    model.train()
    losses = []
    bar = progress_bar(range(training.steps), desc="train small LM", disable=not progress)
    for _ in bar:
        batch = rows[torch.randint(rows.shape[0], (training.batch_size,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def train_small_lm(config: SmallLMConfig = SmallLMConfig(), training: SmallLMTraining = SmallLMTraining(),
                   progress: bool = True, docs: list[str] | None = None,
                   ) -> tuple[SimpleLlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train the tokenizer and the LM on `docs` (default: the standard library's docstrings); returns both and a report
    with the recipe and the train / held-out cross-entropy next to the unigram entropy (all in nats per token)."""
    start = time.perf_counter()
    docs = stdlib_docstrings(min_chars=training.min_chars, subpackages=True) if docs is None else docs
    train_docs, eval_docs = split_documents(docs, training.eval_fraction)
    tokenizer = train_tokenizer(train_docs, config.vocab_size)
    train_rows = token_rows(train_docs, tokenizer, config.n_ctx)
    eval_rows = token_rows(eval_docs, tokenizer, config.n_ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        model = SimpleLlamaForCausalLM(config.hf_config())
    losses = fit_lm(model, train_rows, training, progress)
    report = {
        "config": asdict(config), "training": asdict(training), "seed": training.seed,
        "train_ce": mean_cross_entropy(model, _sample_rows(train_rows, eval_rows.shape[0], training.seed),
                                       training.batch_size),
        "heldout_ce": mean_cross_entropy(model, eval_rows, training.batch_size),
        "unigram_entropy": unigram_entropy(train_rows, config.vocab_size),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "documents": {"train": len(train_docs), "heldout": len(eval_docs)},
        "tokens": {"train": train_rows.numel(), "heldout": eval_rows.numel()},
        "seconds": time.perf_counter() - start, "python": platform.python_version(), "torch": torch.__version__,
    }
    return model.eval(), tokenizer, report


# -- saving, loading and the cached default model ------------------------------------------------------------------


def save_small_lm(model: SimpleLlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike[str],
                  report: dict[str, Any], overwrite: bool = False) -> None:
    """Write the model (`config.json`, `model.safetensors`), the tokenizer and `training.json` into `path`,
    atomically (built aside, then renamed in)."""
    with store.atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        store.write_json(tmp / "training.json", report)


def load_small_lm(path: str | os.PathLike[str]) -> tuple[SimpleLlamaForCausalLM, PreTrainedTokenizerFast]:
    """The model (in eval mode) and tokenizer saved by `save_small_lm`, read offline from `path`."""
    from transformers import AutoTokenizer

    root = Path(path)
    if not (root / "config.json").is_file():
        raise store.StoreError(f"{str(root)!r} holds no config.json; pass a directory written by save_small_lm "
                               "or `decomp-hooks toy lm --out DIR`.")
    model = SimpleLlamaForCausalLM.from_pretrained(root)
    return model.eval(), AutoTokenizer.from_pretrained(root)


def default_cache_root() -> Path:
    """`$XDG_CACHE_HOME/decomp-hooks/small-lm`, or `~/.cache/decomp-hooks/small-lm`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "decomp-hooks" / "small-lm"


def recipe_key(config: SmallLMConfig, training: SmallLMTraining) -> str:
    """Short hash of architecture + recipe (seed included): the cache directory's name."""
    blob = json.dumps({"config": asdict(config), "training": asdict(training)}, sort_keys=True)
    return f"seed{training.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def small_lm_dir(seed: int = 0, progress: bool = True, root: Path | None = None) -> Path:
    """Directory of the default small LM trained with `seed`: trained and saved on first use (a few minutes on a
    laptop CPU), reused afterwards. Load it with `load_small_lm` or any Hugging Face `from_pretrained`."""
    training = SmallLMTraining(seed=seed)
    path = (default_cache_root() if root is None else Path(root)) / recipe_key(SmallLMConfig(), training)
    if (path / "training.json").is_file():
        return path
    model, tokenizer, report = train_small_lm(SmallLMConfig(), training, progress)
    try:
        save_small_lm(model, tokenizer, path, report)
    except store.StoreError:
        if not (path / "training.json").is_file():  # not another process's finished copy: a real conflict
            raise
    return path


# -- TransformerLens ----------------------------------------------------------------------------------------------


def hooked_state_dict(model: SimpleLlamaForCausalLM) -> dict[str, Tensor]:
    """The model's weights under TransformerLens names and layouts (`W_Q [n_heads, d_model, d_head]`, `W_in
    [d_model, d_mlp]`, …), zero biases included."""
    c = model.config
    h, dh, d = c.num_attention_heads, c.head_dim, c.hidden_size
    sd = {"embed.W_E": model.model.embed_tokens.weight, "ln_final.w": model.model.norm.weight,
          "unembed.W_U": model.lm_head.weight.T, "unembed.b_U": torch.zeros(c.vocab_size)}
    for i, layer in enumerate(model.model.layers):
        attn, mlp, pre = layer.self_attn, layer.mlp, f"blocks.{i}."
        for name, proj in (("Q", attn.q_proj), ("K", attn.k_proj), ("V", attn.v_proj)):
            sd[f"{pre}attn.W_{name}"] = proj.weight.T.reshape(d, h, dh).permute(1, 0, 2)
            sd[f"{pre}attn.b_{name}"] = torch.zeros(h, dh)
        sd[f"{pre}attn.W_O"] = attn.o_proj.weight.T.reshape(h, dh, d)
        sd[f"{pre}attn.b_O"] = torch.zeros(d)
        sd[f"{pre}ln1.w"], sd[f"{pre}ln2.w"] = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        sd[f"{pre}mlp.W_in"], sd[f"{pre}mlp.b_in"] = mlp.c_fc.weight.T, torch.zeros(c.intermediate_size)
        sd[f"{pre}mlp.W_out"], sd[f"{pre}mlp.b_out"] = mlp.down_proj.weight.T, torch.zeros(d)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    return {k: v.detach().to(device=device, dtype=dtype).contiguous().clone() for k, v in sd.items()}


def to_hooked_transformer(model: SimpleLlamaForCausalLM, tokenizer: Any = None) -> Any:
    """A TransformerLens 3 `HookedTransformer` with the same weights and logits (a `sae_lens.HookedSAETransformer`
    when sae-lens is installed, so SAEs can be spliced in); no LayerNorm folding or weight centring."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    try:
        from sae_lens import HookedSAETransformer as hooked_class
    except ImportError:
        hooked_class = HookedTransformer
    c = model.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads, n_layers=c.num_hidden_layers,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings, act_fn="gelu",
        normalization_type="RMS", eps=c.rms_norm_eps, positional_embedding_type="rotary", rotary_dim=c.head_dim,
        rotary_base=c.rope_theta, rotary_adjacent_pairs=False, gated_mlp=False, default_prepend_bos=False,
        device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    hooked = hooked_class(cfg)
    if tokenizer is not None:  # set_tokenizer would re-load it from `name_or_path`, which a new tokenizer lacks
        hooked.tokenizer = tokenizer
        hooked.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    hooked.load_and_process_state_dict(hooked_state_dict(model), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False,
                                       refactor_factored_attn_matrices=False)
    return hooked.eval()
