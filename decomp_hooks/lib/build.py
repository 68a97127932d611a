"""`local_interaction_basis`: the bases computed backwards from the output, then the interaction edges.

Everything runs on the model's device; the Gram, M′ and all eigendecompositions are float64
(docs/methods/lib.md#numerics-and-cost).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decomp_hooks.activations import Moments
from decomp_hooks.adapters import adapter_for
from decomp_hooks.data import DataError, iter_batches
from decomp_hooks.lib.basis import (
    F64,
    LayerBasis,
    Truncation,
    centred_gram,
    identity_basis,
    lib_basis,
    pca_basis,
    whitening,
    with_constant,
)
from decomp_hooks.lib.config import LIBConfig, load_lib_config
from decomp_hooks.lib.jacobians import Directions, integration_points, vjp_chunks
from decomp_hooks.lib.nodes import NodeLayers
from decomp_hooks.lib.reduce import all_reduce_sum, total
from decomp_hooks.lib.result import LIBResult
from decomp_hooks.progress import progress_bar


def working_model(model: Any, cfg: LIBConfig) -> tuple[nn.Module, torch.device, torch.dtype]:
    """The module to run (its adapter's torch module; a float64 copy when `dtype: float64` and the model is not), its
    device and dtype."""
    module = adapter_for(model).module(model)
    param = next(module.parameters(), None)
    device = torch.device(cfg.device) if cfg.device else (param.device if param is not None else torch.device("cpu"))
    dtype = getattr(torch, cfg.dtype)
    if param is None or param.dtype != dtype or param.device != device:
        module = nn.Module.to(copy.deepcopy(module), device=device, dtype=dtype)  # bypasses toolkit overrides of .to
    return module.eval(), device, dtype


def batches(data: Any, batch_size: int, n_samples: int | None, device: torch.device, dtype: torch.dtype) -> list[Any]:
    """The batches LIB uses: up to `n_samples` rows of a tensor, an iterable of batches or a sampler, on `device`,
    with floating-point tensor batches cast to `dtype`."""
    out = [b.to(dtype) if isinstance(b, Tensor) and b.is_floating_point() else b
           for b in iter_batches(data, batch_size, device=device, n_samples=n_samples)]
    if not out:
        raise DataError("LIB got no data; pass a tensor of inputs, a list/DataLoader of batches or a sampler.")
    return out


def budget_bytes(cfg: LIBConfig, device: torch.device) -> int:
    """Bytes per chunk of vmapped VJPs: large chunks keep a GPU busy; on a CPU, chunks that stay in cache are fastest
    (measured in benchmarks/bench_lib.py)."""
    gb = cfg.memory_budget_gb if cfg.memory_budget_gb is not None else (2.0 if device.type == "cuda" else 0.03)
    return int(gb * 2**30)


def _isolated(nodes: NodeLayers, layer: int, names: list[str]) -> list[int]:
    """Coordinate indices kept as their own directions: the constant (last), then the named members' coordinates."""
    width = sum(nodes.widths[layer])
    slices = nodes.member_slices(layer)
    return [width] + [i for n in names if n in slices for i in range(slices[n].start, slices[n].stop)]


@torch.no_grad()  # torch.func transforms still differentiate in x; no graph to the parameters is built
def jacobian_gram(nodes: NodeLayers, layer: int, data: list[Any], c_next: Tensor, cfg: LIBConfig,
                  generator: torch.Generator, progress: bool = False) -> Tensor:
    """`M′ = (1/(N·P_in)) Σ_x Σ_s Σ_{t,i} J Jᵀ` of the next layer's LIB functions w.r.t. node layer `layer` (step 4)."""
    alphas, weights = integration_points(cfg.integration, cfg.n_intervals)
    d = sum(nodes.widths[layer])
    acc = torch.zeros(d + 1, d + 1, dtype=F64, device=c_next.device)
    rows = 0
    budget = budget_bytes(cfg, c_next.device)
    for batch in progress_bar(data, desc=f"M' {nodes.names[layer]}", disable=not progress, leave=False):
        (x,) = nodes.read(batch, [layer])
        c = c_next.to(x.dtype)
        fn = lambda z: nodes.run_from(layer, batch, z)  # noqa: E731
        make = lambda shape: Directions(shape, c, cfg.n_stochastic_sources_basis, generator)  # noqa: E731
        for g in vjp_chunks(fn, x, make, budget, alphas, weights):
            g = g.reshape(-1, d).to(F64)
            acc[:d, :d] += g.T @ g
        rows += x.shape[0] * x.shape[1]
    return all_reduce_sum(acc) / (total(rows, acc.device) * (cfg.n_stochastic_sources_basis or 1))


@torch.no_grad()
def edge_matrix(nodes: NodeLayers, layer: int, data: list[Any], lower: LayerBasis, upper: LayerBasis, cfg: LIBConfig,
                generator: torch.Generator, progress: bool = False) -> Tensor:
    """`E [k_{l+1}, k_l]`: the `squared` edges, (Σ_α w_α Σ_s ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j} · f̂^l_{s,j})² averaged over
    samples and input positions and summed over output positions (docs/methods/lib.md#edges)."""
    alphas, weights = integration_points(cfg.integration, cfg.n_intervals)
    d = sum(nodes.widths[layer])
    k_in, k_out = lower.C.shape[1], upper.C.shape[1]
    acc, rows = None, 0
    budget = budget_bytes(cfg, upper.C.device)
    n_src = cfg.n_stochastic_sources_edges
    for batch in progress_bar(data, desc=f"edges {nodes.names[layer]}", disable=not progress, leave=False):
        (x,) = nodes.read(batch, [layer])
        c_in, c_in_pinv, c_out = (t.to(x.dtype) for t in (lower.C, lower.C_pinv, upper.C))
        y = with_constant(x) @ c_in
        fn = lambda z: nodes.run_from(layer, batch, (z @ c_in_pinv)[..., :d])  # noqa: E731
        make = lambda shape: Directions(shape, c_out, n_src, generator)  # noqa: E731
        parts = [(g * y).sum(2).to(F64).pow(2).sum(1) for g in vjp_chunks(fn, y, make, budget, alphas, weights)]
        per_phi = torch.cat(parts).view(-1, k_out, k_in).sum(0)
        acc = per_phi if acc is None else acc + per_phi
        rows += x.shape[0] * x.shape[1]
    return all_reduce_sum(acc) / (total(rows, acc.device) * (n_src or 1))


def local_interaction_basis(model: Any, data: Any, layers: list[str | list[str]] | None = None,
                            config: LIBConfig | dict | str | Path | None = None, *, gram_data: Any = None,
                            progress: bool = True, **overrides: Any) -> LIBResult:
    """Local Interaction Basis (or, with `basis="pca"`, the PCA baseline through the same code) of `model` at the node
    `layers` (module paths / TransformerLens hook points in forward order, `"output"` last), and the interaction
    edges between adjacent node layers. `data`: a tensor of inputs, a list/DataLoader of batches, or a sampler
    with `n_samples`; `gram_data` optionally feeds the Grams. Any LIBConfig field can be passed as a keyword."""
    cfg = load_lib_config(config, layers=layers, **overrides)
    precision = source_precision(model)
    module, device, dtype = working_model(model, cfg)
    nodes = NodeLayers(module, cfg.layers, cfg.last_position_from)
    main = batches(data, cfg.batch_size, cfg.n_samples, device, dtype)
    grams = main if gram_data is None else batches(gram_data, cfg.batch_size, None, device, dtype)
    return build_graph(nodes, main, grams, cfg, device, progress, precision=precision)


def source_precision(model: Any) -> torch.dtype:
    """The dtype of the model's floating-point weights as given (float32 when it has none)."""
    params = [p for p in adapter_for(model).module(model).parameters() if p.is_floating_point()]
    return params[0].dtype if params else torch.float32


def build_graph(nodes: NodeLayers, main: list[Any], grams: list[Any], cfg: LIBConfig, device: torch.device,
                progress: bool = False, gram_fn: Callable = jacobian_gram, edge_fn: Callable = edge_matrix,
                precision: torch.dtype = torch.float32) -> LIBResult:
    """Moments, bases backwards from the output, and edges, on prepared batches; `gram_fn` / `edge_fn` compute M′
    and E (benchmarks swap in other implementations). `precision`: the dtype the model's weights were given in,
    which sets how small an eigenvalue can be told from zero (`Truncation`), whatever dtype LIB computes in."""
    generator = torch.Generator(device).manual_seed(cfg.seed)

    moments: list[Moments] = []
    with torch.no_grad():
        for batch in progress_bar(grams, desc="Grams", disable=not progress, leave=False):
            acts = nodes.read(batch)
            moments = moments or [Moments(a.shape[-1], device=device) for a in acts]
            for m, a in zip(moments, acts):
                m.update(a)
    for m in moments:
        for t in m.sums():
            all_reduce_sum(t)
        m.n = total(m.n, device)

    last = len(nodes) - 1
    bases: list[LayerBasis | None] = [None] * len(nodes)
    final_iso = _isolated(nodes, last, cfg.isolate)
    cut = [Truncation.for_dtype(cfg.truncation_threshold, precision, m.sum_x.numel() + 1) for m in moments]
    bases[last] = (pca_basis(centred_gram(moments[last]), moments[last].mean(), final_iso, cut[last])
                   if cfg.rotate_final else identity_basis(sum(nodes.widths[last]), device))
    for layer in progress_bar(range(last - 1, -1, -1), desc=f"{cfg.basis} bases", disable=not progress):
        g, mu, iso = centred_gram(moments[layer]), moments[layer].mean(), _isolated(nodes, layer, cfg.isolate)
        if cfg.basis == "pca":
            bases[layer] = pca_basis(g, mu, iso, cut[layer])
            continue
        r, r_pinv, n_iso = whitening(g, mu, iso, cut[layer])
        m_prime = gram_fn(nodes, layer, main, bases[layer + 1].C, cfg, generator, progress)
        bases[layer] = lib_basis(r, r_pinv, n_iso, m_prime, cut[layer])

    edges = {}
    if cfg.edges:
        for layer in progress_bar(range(last), desc="edges", disable=not progress):
            edges[layer] = edge_fn(nodes, layer, main, bases[layer], bases[layer + 1], cfg, generator, progress)
    return LIBResult.from_bases(nodes, bases, moments, edges, cfg)


