"""Clustering components by co-firing with the MDL merge of VPD (`docs/clustering.md`, design vpd.md §6).

A component fires on a token where its causal importance exceeds τ; a group fires where any member fires (OR). A
clustering into k groups costs L = Σ_i s_i (log2 k + α r_i) bits (s_i: tokens group i fires on, r_i: its members), and
merging groups i and j changes that by

    ΔL(i, j) = (s_Σ − s_i − s_j) log2((k−1)/k) + s_∪ log2(k−1) − (s_i + s_j) log2 k
               + α (s_∪ (r_i + r_j) − s_i r_i − s_j r_j)

with s_∪ = s_i + s_j − coact_ij (evaluated rearranged, see `merge_costs`). Each step merges the pair at cost rank J
(J = 0 the cheapest), drawn with P ∝ exp(−rank_decay·J) from a seeded generator, down to one cluster; the clustering
kept is the one at the minimum of the cost curve, the step where ΔL crosses 0.

After a merge, the merged group's co-firing with another group C is |(A ∪ B) ∩ C|, which pairwise counts do not give.
The exact path keeps the sampled tokens' binary firing as a packed bit matrix, int64 words `[N, ⌈T/64⌉]` (one bit
per token and component), and computes the merged group's row by bitwise OR and popcount against every group at
once. A harvest's pairwise counts are exact only up to the first merge; from them the merged co-firing is
inclusion–exclusion, coact_AC + coact_BC − |A ∩ B ∩ C|, with the unknown triple count at its largest possible value,
min(coact_AB, coact_AC, coact_BC): a lower bound, exact when A and B always fire together or never together.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decomp_hooks import store
from decomp_hooks.progress import progress_bar

FORMAT = "decomp-hooks/clusters"
VERSION = 1
#: int64 words of packed firing one popcount pass holds at once (bounds the merge step's temporary memory)
CHUNK_WORDS = 1 << 23
#: below this many rows the merge state is never compacted
MIN_COMPACT = 64

Component = tuple[str, int]


class ClusterError(ValueError):
    """Clustering input or settings that cannot be used; the message names the value and the fix."""


@dataclass(frozen=True)
class ClusterConfig:
    """Merge settings. τ 0.01 is the paper's; the paper run's repository config used τ 0.1, α 10 and 500k tokens."""

    threshold: float = 0.01  # a component fires on a token where its CI > threshold
    alpha: float = 10.0  # bits per member and firing token: the weight of the rank term
    rank_decay: float = 0.2  # P(merge the pair at cost rank J) ∝ exp(−rank_decay·J); math.inf: always the cheapest
    seed: int = 0
    max_tokens: int = 500_000  # the token sample the firing matrix keeps (positions: rows of a toy's batch)
    batch_size: int = 16

    def __post_init__(self) -> None:
        """Refuse values outside their range, naming them."""
        _check_number("threshold", self.threshold, 0.0, 1.0, upper_open=True)
        _check_number("alpha", self.alpha, 0.0, math.inf)
        _check_number("rank_decay", self.rank_decay, 0.0, math.inf, lower_open=True, infinite=True)
        for name, low, high in (("seed", 0, 2**63 - 1), ("max_tokens", 1, 2**31 - 1), ("batch_size", 1, 2**31 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ClusterError(f"{name}={value!r}: must be an integer in [{low}, {high}].")


def _check_number(name: str, value: Any, low: float, high: float, lower_open: bool = False,
                  upper_open: bool = False, infinite: bool = False) -> None:
    """Refuse a setting that is not a real number in its range (NaN included), naming it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (math.isfinite(value) or infinite) and (value > low if lower_open else value >= low)
    ok = ok and (value < high if upper_open else value <= high)
    if not ok:
        bounds = f"{'(' if lower_open else '['}{low}, {high}{')' if upper_open else ']'}"
        raise ClusterError(f"{name}={value!r}: must be a number in {bounds}.")


@dataclass
class Firing:
    """Co-firing over a token sample: the components, how often each fired `[N]`, how often each pair fired together
    `[N, N]` (the diagonal is the count) and, for the exact merge, the packed firing bits, int64 words `[N, ⌈T/64⌉]`
    (bit t mod 64 of word t div 64 of row i: component i fired on token t)."""

    components: list[Component]
    count: torch.Tensor
    coact: torch.Tensor
    tokens: int | None
    bits: torch.Tensor | None = None
    threshold: float | None = None


_SHIFTS = torch.arange(8, dtype=torch.uint8)
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def pack_bits(fired: torch.Tensor) -> torch.Tensor:
    """Boolean firing `[t, N]` as bytes `[⌈t/8⌉, N]`, token 8w + b in bit b of byte w; padding tokens never fire."""
    pad = -fired.shape[0] % 8
    if pad:
        fired = torch.cat([fired, fired.new_zeros(pad, fired.shape[1])])
    lanes = fired.reshape(-1, 8, fired.shape[1]).to(torch.uint8) << _SHIFTS.to(fired.device).view(1, 8, 1)
    return lanes.sum(1, dtype=torch.uint8)


def as_words(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes `[⌈T/8⌉, N]` as one row of int64 words per component, `[N, ⌈T/64⌉]` (zero bytes pad the end)."""
    rows = packed.T
    pad = -rows.shape[1] % 8
    if pad:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], pad)], 1)
    return rows.contiguous().view(torch.int64)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits in each row of int64 words `[..., W]`, as int64 `[...]`: numpy's hardware count on the CPU (numpy
    ≥ 2), the bit-parallel count of `popcount_swar` elsewhere (torch has no popcount)."""
    if words.device.type == "cpu" and hasattr(np, "bitwise_count"):
        return torch.from_numpy(np.bitwise_count(words.numpy().view(np.uint64)).sum(-1, dtype=np.int64))
    return popcount_swar(words)


def popcount_swar(words: torch.Tensor) -> torch.Tensor:
    """Set bits per row of int64 words, counted in parallel within each word (pairs, nibbles, bytes, then the bytes
    summed by shifts); the first step adds masked halves rather than subtracting, so no value ever overflows."""
    v = words & _M1
    v += (words >> 1).bitwise_and_(_M1)  # 2-bit counts
    high = (v >> 2).bitwise_and_(_M2)
    v.bitwise_and_(_M2).add_(high)  # 4-bit counts
    v.add_(v >> 4).bitwise_and_(_M4)  # 8-bit counts
    v.add_(v >> 8).add_(v >> 16).add_(v >> 32)  # the low byte sums all eight
    return v.bitwise_and_(0x7F).sum(-1)


def cofiring_with(bits: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Tokens on which `row` `[W]` and each row of `bits` `[m, W]` both fire, `[m]`, in chunks of CHUNK_WORDS."""
    step = max(1, CHUNK_WORDS // max(bits.shape[1], 1))
    return torch.cat([popcount(bits[i:i + step] & row) for i in range(0, bits.shape[0], step)])


class FiringSample:
    """The firing of a token sample, built up batch by batch: counts, pairwise co-firing and the packed bits."""

    def __init__(self, components: list[Component], device: torch.device | str | None = None):
        self.components, self.tokens, self.chunks = components, 0, []
        self.count = torch.zeros(len(components), dtype=torch.float64, device=device)
        self.coact = torch.zeros(len(components), len(components), dtype=torch.float64, device=device)
        self.pending = torch.zeros(0, len(components), dtype=torch.bool, device=device)  # < 8 tokens not packed yet

    def add(self, fired: torch.Tensor) -> None:
        """Add the firing of `t` more tokens, boolean `[t, N]`."""
        f = fired.float()  # 0/1 products summed in float32 are exact for batches under 2^24 tokens
        self.count += f.sum(0)
        self.coact += f.T @ f
        rows = torch.cat([self.pending, fired])
        whole = rows.shape[0] - rows.shape[0] % 8
        self.chunks.append(pack_bits(rows[:whole]))
        self.pending = rows[whole:]
        self.tokens += fired.shape[0]

    def firing(self, threshold: float | None = None) -> Firing:
        """The sample as `Firing`, with its packed bits `[N, ⌈T/64⌉]` for the exact merge."""
        bits = as_words(torch.cat([*self.chunks, pack_bits(self.pending)]))
        return Firing(self.components, self.count.long(), self.coact.long(), self.tokens, bits, threshold)


def firing_from_matrix(fired: torch.Tensor, components: list[Component] | None = None) -> Firing:
    """`Firing` of a boolean matrix `[T, N]` (token t, component i), e.g. one built by hand; components default to
    ("", i)."""
    if fired.dtype != torch.bool or fired.dim() != 2:
        raise ClusterError(f"firing is a {fired.dtype} tensor of shape {list(fired.shape)}; pass a boolean [T, N].")
    components = components if components is not None else [("", i) for i in range(fired.shape[1])]
    if len(components) != fired.shape[1]:
        raise ClusterError(f"{len(components)} components named for a firing matrix of {fired.shape[1]} columns.")
    sample = FiringSample(components, fired.device)
    sample.add(fired)
    return sample.firing()


@torch.no_grad()
def firing_from_decomposition(dec: Any, data: Any, config: ClusterConfig, progress: bool = True) -> Firing:
    """One streaming pass over up to `config.max_tokens` positions of `data`: counts, pairwise co-firing and the
    packed firing bits of every component of every site (CI > threshold)."""
    from decomp_hooks.data import to_device
    from decomp_hooks.export.inputs import checked_batches

    sample = FiringSample([(n, c) for n in dec.site_names for c in range(dec.cm.component(n).C)], dec.device)
    with progress_bar(total=config.max_tokens, desc="co-firing", unit="tok", disable=not progress) as bar:
        for batch in checked_batches(dec, data, config.batch_size, None, ClusterError):
            ci = dec.causal_importance(to_device(batch, dec.device))
            flat = torch.cat([ci[n].reshape(-1, ci[n].shape[-1]) for n in dec.site_names], 1)
            fired = flat[:config.max_tokens - sample.tokens] > config.threshold
            sample.add(fired)
            bar.update(fired.shape[0])
            if sample.tokens >= config.max_tokens:
                break
    if sample.tokens == 0:
        raise ClusterError("the data yielded no batches; pass inputs with at least one row.")
    return sample.firing(config.threshold)


def firing_from_harvest(path: str | Path) -> Firing:
    """The pairwise counts of a finished harvest (`decomp_hooks.harvest`: `count` `[N]`, `coact` `[N, N]` of
    cofiring.safetensors, components in harvest.json's order); no firing bits, so the merge is approximate."""
    from decomp_hooks.harvest import load_harvest

    h = load_harvest(path)
    return Firing(h.components, h.count.round().long(), h.coact.round().long(), h.tokens, threshold=h.threshold)


def merge_costs(s: torch.Tensor, r: torch.Tensor, coact: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """ΔL(i, j) for every pair of groups `[m, m]` (vpd.md §6), from firing counts `s` and ranks `r` `[m]`, co-firing
    `coact` `[m, m]` and the number of groups k. With log2(k−1) = log2((k−1)/k) + log2 k the formula is
    s_Σ log2((k−1)/k) − log2(k−1)·coact_ij + `pair_terms`: one constant, one multiple of coact, and a part that does
    not change with k, which the merge keeps up to date row by row."""
    s, r = s.double(), r.double()
    shared = float(s.sum()) * math.log2((k - 1) / k)
    return pair_terms(s, r, coact.double(), s, r, alpha).sub_(coact.double() * math.log2(k - 1)).add_(shared)


def pair_terms(s_rows: torch.Tensor, r_rows: torch.Tensor, coact_rows: torch.Tensor, s: torch.Tensor,
               r: torch.Tensor, alpha: float) -> torch.Tensor:
    """α (s_i r_j + s_j r_i − coact_ij (r_i + r_j)) for groups i (the rows given) against all groups j: the rank term
    of ΔL, α (s_∪ (r_i + r_j) − s_i r_i − s_j r_j), with s_∪ = s_i + s_j − coact_ij multiplied out."""
    si, ri = s_rows[:, None], r_rows[:, None]
    return (si * r).add_(s * ri).sub_(coact_rows * (ri + r)).mul_(alpha)


def description_length(s: torch.Tensor, r: torch.Tensor, alpha: float) -> float:
    """L = Σ_i s_i (log2 k + α r_i) over the groups with r > 0."""
    live = r > 0
    k = int(live.sum())
    return float((s[live].double() * (math.log2(k) + alpha * r[live].double())).sum())


def sample_rank(pairs: int, decay: float, generator: torch.Generator) -> int:
    """A cost rank J in [0, pairs) with P(J) ∝ exp(−decay·J), by inverting the truncated geometric distribution."""
    ratio = math.exp(-decay)
    if ratio == 0.0 or pairs == 1:
        return 0
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(int(math.log1p(-u * (1.0 - ratio ** pairs)) / math.log(ratio)), pairs - 1)


class _Merger:
    """The groups during the merge, one row each: firing counts `s`, ranks `r`, co-firing `coact` and the first member
    `lead` (float64 holds the counts exactly); `terms` holds `pair_terms` for the pairs i < j of live groups and +inf
    elsewhere. Rows of merged-away groups stay dead until the state is compacted."""

    def __init__(self, firing: Firing, live: torch.Tensor, alpha: float):
        self.alpha = alpha
        self.s, self.coact = firing.count[live].double(), firing.coact[live][:, live].double()
        self.r = torch.ones_like(self.s)
        self.lead = torch.arange(live.numel(), device=self.s.device)  # index into the clustered components
        self.alive = torch.ones_like(self.s, dtype=torch.bool)
        self.bits = None if firing.bits is None else firing.bits[live].clone()
        self.terms = pair_terms(self.s, self.r, self.coact, self.s, self.r, alpha)
        self.terms.masked_fill_(torch.ones_like(self.terms, dtype=torch.bool).tril(), math.inf)

    def pick(self, decay: float, generator: torch.Generator) -> tuple[int, int, float]:
        """Rows (a < b) of the pair at a sampled cost rank, and its ΔL: the J + 1 cheapest pairs are the cheapest of
        each row's J + 1 cheapest."""
        k, m = int(self.alive.sum()), self.s.numel()
        costs = torch.add(self.terms, self.coact, alpha=-math.log2(k - 1))  # ΔL less its constant
        J = sample_rank(k * (k - 1) // 2, decay, generator)
        row_values, row_index = costs.topk(min(J + 1, m), dim=1, largest=False)
        values, flat = row_values.flatten().topk(J + 1, largest=False)
        a, slot = divmod(int(flat[-1]), row_values.shape[1])
        shared = float(self.s.sum()) * math.log2((k - 1) / k)
        return a, int(row_index[a, slot]), float(values[-1]) + shared

    def merge(self, a: int, b: int) -> int:
        """Merge row b into row a; returns the merged group's firing count s_∪."""
        union = self.s[a] + self.s[b] - self.coact[a, b]
        if self.bits is None:
            ac, bc = self.coact[a], self.coact[b]
            row = ac + bc - torch.minimum(torch.minimum(ac, bc), self.coact[a, b])
        else:
            self.bits[a] |= self.bits[b]
            self.bits[b] = 0
            row = cofiring_with(self.bits, self.bits[a]).double()
        row[a], row[b] = union, 0
        self.coact[a], self.coact[:, a], self.coact[b], self.coact[:, b] = row, row, 0, 0
        self.s[a], self.s[b] = union, 0
        self.r[a], self.r[b] = self.r[a] + self.r[b], 0
        self.alive[b] = False
        terms = pair_terms(self.s[a:a + 1], self.r[a:a + 1], row[None], self.s, self.r, self.alpha)[0]
        terms[~self.alive] = math.inf
        self.terms[a, a + 1:], self.terms[:a, a] = terms[a + 1:], terms[:a]
        self.terms[b], self.terms[:, b] = math.inf, math.inf
        if self.s.numel() >= MIN_COMPACT and 2 * int(self.alive.sum()) <= self.s.numel():
            self._compact()
        return int(union)

    def _compact(self) -> None:
        """Drop dead rows, so a step's work follows the number of groups left."""
        keep = self.alive.nonzero().flatten()
        self.s, self.r, self.lead, self.alive = self.s[keep], self.r[keep], self.lead[keep], self.alive[keep]
        self.coact, self.terms = self.coact[keep][:, keep], self.terms[keep][:, keep]
        if self.bits is not None:
            self.bits = self.bits[keep]


@torch.no_grad()
def merge_components(firing: Firing, config: ClusterConfig, progress: bool = True) -> "Clusters":
    """The MDL merge of every component that fired, down to one cluster; the step kept is the cost curve's minimum."""
    live = (firing.count > 0).nonzero().flatten()
    if live.numel() == 0:
        raise ClusterError(f"no component fired (CI > {firing.threshold}) on the {firing.tokens} tokens sampled; "
                           "lower the threshold or pass more data.")
    state = _Merger(firing, live, config.alpha)
    cost = [description_length(state.s, state.r, config.alpha)]
    merges, merged_firing, delta = [], [], []
    generator = torch.Generator().manual_seed(config.seed)
    for _ in progress_bar(range(live.numel() - 1), desc="merging", unit="merge", disable=not progress):
        a, b, dl = state.pick(config.rank_decay, generator)
        merges.append((int(state.lead[a]), int(state.lead[b])))
        merged_firing.append(state.merge(a, b))
        delta.append(dl)
        cost.append(cost[-1] + dl)
    chosen = min(range(len(cost)), key=cost.__getitem__)
    live_list = live.tolist()
    settings = {**asdict(config), "threshold": firing.threshold, "exact": firing.bits is not None}
    return Clusters(components=[firing.components[i] for i in live_list], firing=firing.count[live].tolist(),
                    dead=[firing.components[i] for i in sorted(set(range(len(firing.components))) - set(live_list))],
                    tokens=firing.tokens, merges=merges, merged_firing=merged_firing, delta=delta, cost=cost,
                    chosen_step=chosen, config=settings)


@dataclass
class Clusters:
    """The merge of the components that fired (`components`, each one's firing count `firing`; `dead` never fired):
    `merges[t]` joins the groups led by these two components (indices into `components`; the smaller leads the
    merged group, which fires on `merged_firing[t]` tokens), ΔL `delta[t]`, the cost curve `cost` (before any merge,
    then after each) and the step kept, `chosen_step` merges in."""

    components: list[Component]
    firing: list[int]
    dead: list[Component]
    tokens: int | None
    merges: list[tuple[int, int]]
    merged_firing: list[int]
    delta: list[float]
    cost: list[float]
    chosen_step: int
    config: dict

    def groups(self, step: int | None = None) -> list[tuple[list[int], int]]:
        """(member indices, firing count) of each group after `step` merges (default: the chosen step)."""
        step = self.chosen_step if step is None else step
        members = {i: [i] for i in range(len(self.components))}
        fires = dict(enumerate(self.firing))
        for (a, b), s in zip(self.merges[:step], self.merged_firing[:step]):
            members[a] += members.pop(b)
            fires[a] = s
        return [(members[lead], fires[lead]) for lead in members]

    def clusters(self, step: int | None = None) -> list[dict]:
        """The groups after `step` merges as `{"members": [[site, index], ...], "rank", "firing"}`, largest first."""
        out = [{"members": [list(self.components[i]) for i in sorted(m)], "rank": len(m), "firing": int(s)}
               for m, s in self.groups(step)]
        return sorted(out, key=lambda g: (-g["rank"], -g["firing"]))

    def to_dict(self) -> dict:
        """The content of clusters.json."""
        return {"format": FORMAT, "version": VERSION, "config": self.config, "tokens": self.tokens,
                "components": [list(c) for c in self.components], "firing": self.firing,
                "dead": [list(c) for c in self.dead], "chosen_step": self.chosen_step,
                "clusters": self.clusters(), "merges": [list(p) for p in self.merges],
                "merged_firing": self.merged_firing, "delta_cost": self.delta, "cost": self.cost}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write clusters.json, atomically: to `path` itself when it ends in .json, else into directory `path`
        together with clusters.html (the cluster page). Returns the JSON file's path."""
        path, content = Path(path), self.to_dict()
        if path.suffix == ".json":
            if path.exists() and not overwrite:
                raise ClusterError(f"{str(path)!r} already exists; choose another path or pass overwrite=True.")
            path.parent.mkdir(parents=True, exist_ok=True)
            store.write_json(path, content)
            return path
        from decomp_hooks.dashboard.clusters import write_cluster_page

        replace = store.replaceable_dir(path, overwrite, ClusterError)
        with store.atomic_dir(path, overwrite=replace) as tmp:
            store.write_json(tmp / "clusters.json", content)
            write_cluster_page(content, tmp / "clusters.html")
        return path / "clusters.json"


def read_clusters(path: str | Path) -> dict:
    """clusters.json (a file, or a directory holding one) as written by `Clusters.save`."""
    path = Path(path)
    data = store.read_json(path / "clusters.json" if path.is_dir() else path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ClusterError(f"{str(path)!r} is not a decomp-hooks clusters file (format {FORMAT!r}).")
    if data.get("version") != VERSION:
        raise ClusterError(f"{str(path)!r} has clusters format version {data.get('version')}; this release reads "
                           f"{VERSION}.")
    return data


def cluster(source: Any, data: Any = None, out: str | Path | None = None, *, threshold: float = 0.01,
            alpha: float = 10.0, rank_decay: float = 0.2, seed: int = 0, max_tokens: int = 500_000,
            batch_size: int = 16, overwrite: bool = False, progress: bool = True) -> Clusters:
    """Cluster components by co-firing with the MDL merge. `source`: a decomposition with `data` (a tensor of rows
    or token ids, or an iterable of batches, of which up to `max_tokens` positions are read): the exact path; a
    `Firing` (e.g. `firing_from_matrix`); or a harvest directory (pairwise counts: approximate after the first
    merge). `out`: a .json file, or a directory for clusters.json and clusters.html, written atomically. Settings:
    see `ClusterConfig`."""
    config = ClusterConfig(threshold, alpha, rank_decay, seed, max_tokens, batch_size)
    kind = "firing" if isinstance(source, Firing) else "harvest" if isinstance(source, (str, Path)) else "decomposition"
    if kind != "decomposition" and data is not None:
        raise ClusterError(f"a {kind} holds its own counts; pass data only with a decomposition.")
    if kind == "decomposition" and data is None:
        raise ClusterError("pass the data to read the decomposition's firing from (e.g. token ids [n, seq]), or a "
                           "harvest directory instead of the decomposition.")
    firing = source if kind == "firing" else firing_from_harvest(source) if kind == "harvest" else \
        firing_from_decomposition(source, data, config, progress)
    clusters = merge_components(firing, config, progress)
    clusters.config["source"] = kind
    if out is not None:
        clusters.save(out, overwrite=overwrite)
    return clusters
