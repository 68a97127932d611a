"""What a harvest keeps while it streams: accumulators whose sizes are fixed by the components N, the vocabulary V and
the settings, never by the number of tokens.

- `ComponentStats` (the dashboards' statistics, over all N components of all sites at once): firing counts, CI and
  signed-activation histograms, and the co-firing counts `[N, N]`.
- `TopContexts`: per component the top-k positions by CI-gated |activation| |g·a| where it fires, with their token
  windows and the component's CI and activation over each window.
- `TokenPMI` (one for the input token, one for the next token): token counts for pointwise mutual information, the
  joint counts kept by one of `TOKEN_COUNTS` (a dense `[N, V]` table, or bounded Misra–Gries summaries).
"""
from __future__ import annotations

import torch

from decomp_hooks.dashboard.statistics import ComponentStats

PAD = -1  # token id of window positions beyond the ends of a sequence
NEG = float("-inf")


class TopContexts:
    """A top-k heap per component, vectorised over components: `rank [N, k]` (|g·a|, −inf where empty), `position
    [N, k]` (flattened over the whole pass, −1 where empty), and over the ±w window around each example `tokens
    [N, k, 2w+1]` (int32; PAD beyond the sequence), `ci` and `acts` (0 there). Each batch's own top k merge with the
    kept ones, and windows are read only for the positions that enter."""

    FIELDS = ("rank", "position", "tokens", "ci", "acts")

    def __init__(self, N: int, k: int, w: int):
        self.k, self.w = k, w
        W = 2 * w + 1
        self.rank = torch.full((N, k), NEG)
        self.position = torch.full((N, k), -1, dtype=torch.long)
        self.tokens = torch.full((N, k, W), PAD, dtype=torch.int32)
        self.ci, self.acts = torch.zeros(N, k, W), torch.zeros(N, k, W)

    def update(self, ids: torch.Tensor, ci: torch.Tensor, acts: torch.Tensor, fire: torch.Tensor, first: int) -> None:
        """Merge one batch: token ids `[B, T]`, CI, activations and firing `[B·T, N]`, its first flattened position."""
        key = torch.where(fire, (ci * acts).abs(), NEG)
        rank, index = key.topk(min(self.k, key.shape[0]), dim=0)  # the batch's best [k', N]
        merged = torch.cat([self.rank, rank.T], dim=1)
        keep = merged.topk(self.k, dim=1).indices  # < k: a kept example; ≥ k: one of this batch's
        old = keep.clamp_max(self.k - 1)
        self.rank, self.position = merged.gather(1, keep), self.position.gather(1, old)
        for f in ("tokens", "ci", "acts"):
            t = getattr(self, f)
            setattr(self, f, t.gather(1, old[..., None].expand(-1, -1, t.shape[2])))
        entered = keep >= self.k
        filler = entered & (self.rank == NEG)  # a non-firing position of this batch in an empty slot
        self.position[filler], self.tokens[filler], self.ci[filler], self.acts[filler] = -1, PAD, 0.0, 0.0
        component, slot = (entered & ~filler).nonzero(as_tuple=True)
        position = index[keep[component, slot] - self.k, component]
        self.position[component, slot] = position + first
        window = self.windows(ids, ci, acts, position, component)
        self.tokens[component, slot], self.ci[component, slot], self.acts[component, slot] = window

    def windows(self, ids: torch.Tensor, ci: torch.Tensor, acts: torch.Tensor, position: torch.Tensor,
                component: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, CI and activations `[M, 2w+1]` over the windows around batch positions `position [M]`, the
        values of the matching `component [M]`."""
        T = ids.shape[1]
        t = position % T
        around = t[:, None] + torch.arange(-self.w, self.w + 1)
        inside = (around >= 0) & (around < T)
        flat = (position - t)[:, None] + around.clamp(0, T - 1)
        tokens = torch.where(inside, ids.reshape(-1)[flat], PAD).to(torch.int32)
        return tokens, ci[flat, component[:, None]] * inside, acts[flat, component[:, None]] * inside

    def state(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for f in self.FIELDS:
            setattr(self, f, tensors[f])


class DenseCounts:
    """Exact joint counts `n[c, t]` of token t at the positions where component c fires: one `[N, V]` table."""

    def __init__(self, N: int, V: int, size: int):
        self.V = V
        self.counts = torch.zeros(N, V, dtype=torch.float64)

    def update(self, component: torch.Tensor, token: torch.Tensor) -> None:
        """Count (component, token) pairs."""
        self.counts.view(-1).index_add_(0, component * self.V + token, torch.ones(len(token), dtype=torch.float64))

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, counts) `[N, M]` to rank per component: here every token of the vocabulary."""
        return torch.arange(self.V).expand_as(self.counts), self.counts

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.counts = tensors["counts"]


class FrequentCounts:
    """Misra–Gries summaries (mergeable form): per component at most `size` (token, count) pairs. Each batch's exact
    counts are added, then per component the (size+1)-th largest count is subtracted from all and what is left
    positive is kept. A count is under the true one by at most n_c / (size + 1) (n_c: the component's firings), every
    token above that share is kept, and the counts are exact while a component sees at most `size` distinct tokens."""

    def __init__(self, N: int, V: int, size: int):
        self.N, self.V, self.size = N, V, size
        self.tokens = torch.full((N, size), PAD, dtype=torch.long)
        self.counts = torch.zeros(N, size, dtype=torch.float64)

    def update(self, component: torch.Tensor, token: torch.Tensor) -> None:
        """Add the batch's (component, token) pairs, then shrink every summary back to `size` entries."""
        held = self.tokens >= 0
        owner = torch.arange(self.N)[:, None].expand_as(self.tokens)[held]
        keys = torch.cat([owner * self.V + self.tokens[held], component * self.V + token])
        weights = torch.cat([self.counts[held], torch.ones(len(token), dtype=torch.float64)])
        unique, inverse = keys.unique(return_inverse=True)
        total = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, weights)
        order = torch.argsort(-total, stable=True)
        order = order[torch.argsort(unique[order] // self.V, stable=True)]  # by component, largest count first
        c, t, n = unique[order] // self.V, unique[order] % self.V, total[order]
        slot = torch.arange(len(c)) - torch.searchsorted(c, c)
        cut = torch.zeros(self.N, dtype=torch.float64)
        cut[c[slot == self.size]] = n[slot == self.size]
        keep = (slot < self.size) & (n > cut[c])
        self.tokens = torch.full_like(self.tokens, PAD)
        self.counts = torch.zeros_like(self.counts)
        self.tokens[c[keep], slot[keep]] = t[keep]
        self.counts[c[keep], slot[keep]] = n[keep] - cut[c[keep]]

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, counts) `[N, size]` to rank per component: the summary's entries (PAD, 0 where empty)."""
        return self.tokens, self.counts

    def state(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "counts": self.counts}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tokens, self.counts = tensors["tokens"], tensors["counts"]


#: how the joint (component, token) counts are kept, by `HarvestConfig.token_counts`
TOKEN_COUNTS: dict[str, type] = {"dense": DenseCounts, "frequent": FrequentCounts}


class TokenPMI:
    """Counts for the PMI of one side's tokens with each component's firing, over the positions counted: their
    number, each token's count `[V]`, each component's firings `[N]` and the joint counts."""

    def __init__(self, N: int, V: int, kind: str, size: int):
        self.positions = 0
        self.totals = torch.zeros(V, dtype=torch.float64)
        self.fires = torch.zeros(N, dtype=torch.float64)
        self.joint = TOKEN_COUNTS[kind](N, V, size)

    def update(self, fire: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add positions: firing `[P, N]` and the token `[P]` at each."""
        self.positions += len(tokens)
        self.totals.index_add_(0, tokens, torch.ones(len(tokens), dtype=torch.float64))
        self.fires += fire.sum(0, dtype=torch.float64)
        position, component = fire.nonzero(as_tuple=True)
        self.joint.update(component, tokens[position])

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per component the k tokens of highest PMI = log(n[c,t] · P / (n_c · n_t)) among those seen where it fires:
        (token ids `[N, k]`, PAD where fewer; PMI `[N, k]` in nats, −inf there)."""
        tokens, joint = self.joint.candidates()
        total = self.totals[tokens.clamp_min(0)]
        ratio = joint * self.positions / (self.fires[:, None] * total).clamp_min(1e-300)
        pmi = torch.where(joint > 0, ratio.log(), NEG)
        values, index = pmi.topk(min(k, pmi.shape[1]), dim=1)
        return torch.where(values > NEG, tokens.gather(1, index), PAD), values.float()

    def state(self) -> dict[str, torch.Tensor]:
        joint = {f"joint.{k}": v for k, v in self.joint.state().items()}
        return {"totals": self.totals, "fires": self.fires, **joint}

    def load(self, tensors: dict[str, torch.Tensor], positions: int) -> None:
        self.totals, self.fires, self.positions = tensors["totals"], tensors["fires"], positions
        self.joint.load({k.removeprefix("joint."): v for k, v in tensors.items() if k.startswith("joint.")})


SIDES = ("input", "output")  # the token at the firing position; the token after it (the text's next token)


class Accumulators:
    """Everything a harvest keeps over all N components (the sites' components in order): `stats`, `top` and
    `pmi[side]`."""

    def __init__(self, N: int, V: int, threshold: float, top_k: int, window: int, counts: str, summary_size: int):
        self.threshold = threshold
        self.stats = ComponentStats(N, threshold, n_examples=0)
        self.top = TopContexts(N, top_k, window)
        self.pmi = {side: TokenPMI(N, V, counts, summary_size) for side in SIDES}

    def update(self, ids: torch.Tensor, ci: torch.Tensor, acts: torch.Tensor, first: int) -> None:
        """Add one batch: token ids `[B, T]`, CI and activations `[B·T, N]`, its first flattened position."""
        self.stats.update(ci, acts)
        fire = ci > self.threshold
        self.top.update(ids, ci, acts, fire, first)
        self.pmi["input"].update(fire, ids.reshape(-1))
        has_next = torch.arange(ci.shape[0]) % ids.shape[1] < ids.shape[1] - 1
        self.pmi["output"].update(fire[has_next], ids[:, 1:].reshape(-1))

    def files(self, pmi_top: int) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of each file of a harvest directory, derived PMI tables included."""
        s = self.stats
        tokens = {}
        for side, acc in self.pmi.items():
            top_tokens, top_pmi = acc.top(pmi_top)
            tokens.update({f"{side}.{k}": v for k, v in acc.state().items()})
            tokens.update({f"{side}.top_tokens": top_tokens, f"{side}.top_pmi": top_pmi})
        return {"cofiring": {"count": s.features.fires, "coact": s.coactive},
                "histograms": {"ci": s.features.hist, "signed_counts": s.signed.counts, "signed_range": s.signed.range},
                "examples": self.top.state(), "tokens": tokens}

    def scalars(self) -> dict[str, int]:
        """The positions counted, overall and per PMI side (harvest.json keeps them)."""
        sides = {f"{side}_positions": acc.positions for side, acc in self.pmi.items()}
        return {"positions": self.stats.features.positions, **sides}

    def load(self, files: dict[str, dict[str, torch.Tensor]], scalars: dict[str, int]) -> None:
        """Restore the state `files` and `scalars` hold (a checkpoint)."""
        s = self.stats
        s.features.positions = scalars["positions"]
        s.features.fires, s.coactive = files["cofiring"]["count"], files["cofiring"]["coact"]
        h = files["histograms"]
        s.features.hist, s.signed.counts, s.signed.range = h["ci"], h["signed_counts"], h["signed_range"]
        self.top.load(files["examples"])
        for side, acc in self.pmi.items():
            prefix = f"{side}."
            acc.load({k.removeprefix(prefix): v for k, v in files["tokens"].items() if k.startswith(prefix)},
                     scalars[f"{side}_positions"])

