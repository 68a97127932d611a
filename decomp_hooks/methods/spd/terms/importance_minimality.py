"""Importance minimality, few components causally important per input (an annealed p-norm, or a smooth L0 count
with an annealed width), and frequency minimality, which penalises components that are important often so that one
feature is not split among many (docs/methods/spd.md#importance-minimality). The β of importance_minimality folds the
frequency term in with coefficient β·coeff; `frequency_minimality` is the same term on its own, with its own
coefficient."""
from __future__ import annotations

import torch

from decomp_hooks.component_model import CausalImportance
from decomp_hooks.methods.spd.config import LossConfig
from decomp_hooks.methods.spd.terms.base import Term


def linear_anneal(start: float, final: float | None, start_frac: float, end_frac: float, frac: float) -> float:
    """v(t) = v₀ + (v_f − v₀)·clip((t/T − f_s)/(f_e − f_s), 0, 1); v₀ throughout when `final` is None."""
    if final is None:
        return start
    t = min(max((frac - start_frac) / max(end_frac - start_frac, 1e-12), 0.0), 1.0)
    return start + (final - start) * t


def annealed_p(loss: LossConfig, frac: float) -> float:
    """The minimality exponent p at progress `frac` (`pnorm` annealed to `p_anneal_final_p`)."""
    return linear_anneal(loss.pnorm, loss.p_anneal_final_p, loss.p_anneal_start_frac, loss.p_anneal_end_frac, frac)


def annealed_beta(loss: LossConfig, frac: float) -> float:
    """The frequency term's weight β at progress `frac` (`beta` annealed to `beta_anneal_final`): a strong frequency
    term while components form keeps a feature from splitting, a weaker one later gives back CI-L0 and adversarial
    reconstruction."""
    return linear_anneal(loss.beta, loss.beta_anneal_final, loss.beta_anneal_start_frac, loss.beta_anneal_end_frac,
                         frac)


def annealed_gamma(loss: LossConfig, frac: float) -> float | None:
    """The smooth-L0 width γ at progress `frac` (`gamma` annealed to `gamma_anneal_final`), None for the p-norm."""
    if loss.gamma is None:
        return None
    return linear_anneal(loss.gamma, loss.gamma_anneal_final, loss.gamma_anneal_start_frac,
                         loss.gamma_anneal_end_frac, frac)


def penalty(g: torch.Tensor, p: float, eps: float, gamma: float | None) -> torch.Tensor:
    """ψ(g) per value: (g + ε)^p, or with a width γ the smooth L0 count g²/(g² + γ²), which tends to 1[g > 0] as γ
    falls, so that a partly important component costs about as much as a fully important one."""
    if gamma is not None:
        return g.square() / (g.square() + gamma * gamma)
    return g + eps if p == 1 else (g + eps).pow(p)


def minimality(ci: dict[str, CausalImportance], p: float, eps: float, importance: float, frequency: float,
               shards: int, site_weights: dict[str, float] | None = None, gamma: float | None = None) -> torch.Tensor:
    """Σ_l w_l Σ_c [a·μ + b·μ log₂(1 + N·W·μ)], μ_{l,c} = mean over these N positions of ψ(g⁺) (`penalty`), W =
    `shards` the pieces the global batch is computed in (ranks × micro-batches, so N·W·μ is the global batch's sum);
    a = `importance`, b = `frequency`; w_l from `site_weights` (1 for the sites it does not name), so that one site can
    be held to a weaker or stronger sparsity than the rest."""
    weights = site_weights or {}
    total = 0.0
    for name, c in ci.items():
        g = c.upper.flatten(0, -2).float()
        mu = penalty(g, p, eps, gamma).mean(0)
        term = importance * mu if importance != 1 else mu
        if frequency:
            term = term + frequency * mu * torch.log2(1 + g.shape[0] * shards * mu)
        total = total + weights.get(name, 1.0) * term.sum()
    return total


def importance_minimality(ci: dict[str, CausalImportance], p: float, eps: float, beta: float, shards: int,
                          site_weights: dict[str, float] | None = None, gamma: float | None = None) -> torch.Tensor:
    """Σ_l w_l Σ_c [μ + β μ log₂(1 + N·W·μ)]: importance minimality with the frequency term folded in at β."""
    return minimality(ci, p, eps, 1.0, beta, shards, site_weights, gamma)


def _importance(spd, ctx, lc: LossConfig, frac: float) -> torch.Tensor:
    return importance_minimality(ctx.ci, annealed_p(lc, frac), lc.eps, annealed_beta(lc, frac), spd.batch_shards,
                                 spd.site_weights(ctx, lc), annealed_gamma(lc, frac))


def _frequency(spd, ctx, lc: LossConfig, frac: float) -> torch.Tensor:
    return minimality(ctx.ci, annealed_p(lc, frac), lc.eps, 0.0, 1.0, spd.batch_shards, spd.site_weights(ctx, lc),
                      annealed_gamma(lc, frac))


TERMS = {"importance_minimality": Term(_importance), "frequency_minimality": Term(_frequency)}
