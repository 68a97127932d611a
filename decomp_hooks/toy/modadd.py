"""Modular-addition transformer of the LIB paper (docs/toys.md#modular-addition-transformer): 1 layer, no LayerNorm,
trained until it generalises.

Plain torch with TransformerLens-style module names (`blocks.0.hook_resid_pre`, `…hook_resid_mid`,
`…hook_resid_post`, identity modules), so LIB node layers are named as in TransformerLens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decomp_hooks.progress import progress_bar


@dataclass(frozen=True)
class ModAddConfig:
    """Shape of the modular-addition transformer; `d_vocab = p + 1` (the last token is '=')."""

    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 3


class Attention(nn.Module):
    """Causal multi-head attention with biases; `hook_z` carries the per-head values `[B, P, H, d_head]`."""

    def __init__(self, c: ModAddConfig, std: float) -> None:
        super().__init__()
        self.n_heads, self.d_head = c.n_heads, c.d_head
        self.qkv = nn.Linear(c.d_model, 3 * c.n_heads * c.d_head)
        self.out = nn.Linear(c.n_heads * c.d_head, c.d_model)
        self.hook_z = nn.Identity()
        for lin in (self.qkv, self.out):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        self.register_buffer("mask", torch.ones(c.n_ctx, c.n_ctx).tril().bool(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, p, _ = x.shape
        q, k, v = self.qkv(x).view(b, p, 3, self.n_heads, self.d_head).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~self.mask[:p, :p], float("-inf"))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v))
        return self.out(z.reshape(b, p, -1))


class MLP(nn.Module):
    """ReLU MLP; `hook_post` carries the hidden activations `[B, P, d_mlp]`."""

    def __init__(self, c: ModAddConfig, std: float) -> None:
        super().__init__()
        self.W_in, self.W_out, self.hook_post = nn.Linear(c.d_model, c.d_mlp), nn.Linear(c.d_mlp, c.d_model), nn.Identity()
        for lin in (self.W_in, self.W_out):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.W_out(self.hook_post(F.relu(self.W_in(x))))


class Block(nn.Module):
    """Attention then MLP, each added to the residual stream, with TransformerLens hook names."""

    def __init__(self, c: ModAddConfig, std: float) -> None:
        super().__init__()
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn, self.mlp = Attention(c, std), MLP(c, std)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.attn(x))
        x = x[:, -1:] if last_only else x
        return self.hook_resid_post(x + self.mlp(x))


class ModAddTransformer(nn.Module):
    """Tokens `[B, 3]` = (a, b, '=') → logits `[B, 3, p + 1]`; the answer (a + b) mod p is read at the last position."""

    def __init__(self, config: ModAddConfig = ModAddConfig()) -> None:
        super().__init__()
        self.config = config
        std = 0.8 / math.sqrt(config.d_model)  # TransformerLens's default initializer range
        self.embed = nn.Embedding(config.p + 1, config.d_model)
        self.pos_embed = nn.Parameter(torch.randn(config.n_ctx, config.d_model) * std)
        nn.init.normal_(self.embed.weight, std=std)
        self.blocks = nn.ModuleList([Block(config, std)])
        self.unembed = nn.Linear(config.d_model, config.p + 1)
        nn.init.normal_(self.unembed.weight, std=std)
        nn.init.zeros_(self.unembed.bias)

    def forward(self, tokens: Tensor, last_only: bool = False) -> Tensor:
        """Logits `[B, 3, p + 1]`; `last_only` computes the MLP and unembedding at the last position only (training)."""
        x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, last_only)
        return self.unembed(x)


def modadd_dataset(p: int = 113, train_frac: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All pairs (a, b) as tokens `[p², 3]` with labels, split `train_frac` / rest by a seeded permutation."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], 1)
    labels = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_frac * p * p)
    train, test = perm[:n_train], perm[n_train:]
    return tokens[train], labels[train], tokens[test], labels[test]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of last-position argmax predictions equal to the labels."""
    return (logits[:, -1].argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, labels: Tensor, batch_size: int = 4096) -> float:
    """Test accuracy over `tokens` in batches."""
    hits = sum((model(t)[:, -1].argmax(-1) == y).sum().item()
               for t, y in zip(tokens.split(batch_size), labels.split(batch_size)))
    return hits / len(labels)


def train_modadd(config: ModAddConfig = ModAddConfig(), seed: int = 0, max_steps: int = 60_000,
                 stop_accuracy: float = 0.99, lr: float = 1e-3, weight_decay: float = 1.0, warmup_steps: int = 10,
                 eval_every: int = 100, data_seed: int = 0, device: str | torch.device = "cpu",
                 autocast_bf16: bool = True, progress: bool = True) -> tuple[ModAddTransformer, dict[str, float]]:
    """Full-batch AdamW (betas 0.9/0.98, wd 1.0) on the last-position cross-entropy until test accuracy reaches
    `stop_accuracy` (or `max_steps`); returns the model in eval mode and its final train/test accuracy and steps.
    `autocast_bf16` runs the training matmuls in bfloat16 (parameters stay float32; ~2.4× faster on AMX CPUs)."""
    train_x, train_y, test_x, test_y = (t.to(device) for t in modadd_dataset(config.p, seed=data_seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModAddTransformer(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps))
    bar = progress_bar(range(max_steps), desc=f"train modadd s{seed}", disable=not progress)
    test_acc, step = 0.0, 0
    for step in bar:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(train_x, last_only=True)[:, -1]
        loss = F.cross_entropy(logits.float(), train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0:
            test_acc = evaluate(model.eval(), test_x, test_y)
            model.train()
            bar.set_postfix(loss=f"{loss.item():.2e}", test=f"{test_acc:.4f}", refresh=False)
            if test_acc >= stop_accuracy:
                break
    model.eval()
    return model, {"train_accuracy": evaluate(model, train_x, train_y), "test_accuracy": test_acc, "steps": step + 1}


class ModAddSampler:
    """Data callable `sampler(batch_size) -> tokens [batch_size, 3]`: rows of the training split, global RNG."""

    def __init__(self, config: ModAddConfig, device: str | torch.device | None = None, data_seed: int = 0) -> None:
        self.tokens = modadd_dataset(config.p, seed=data_seed)[0].to(device)

    def __call__(self, batch_size: int) -> Tensor:
        return self.tokens[torch.randint(len(self.tokens), (batch_size,), device=self.tokens.device)]


def fit_modadd(config: ModAddConfig, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
               steps: int = 60_000, **recipe) -> ModAddTransformer:
    """`train_modadd` in the toy registry's calling convention (`steps` = the step cap); returns the model."""
    return train_modadd(config, seed=seed, max_steps=steps, device=device, progress=progress, **recipe)[0]

