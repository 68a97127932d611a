"""APD's layout: C components of rank m per site, stored as C·m consecutive rank-one columns of that site's
`SiteComponents` (its `group_size`), so `P_{c,l} = V[:, c·m:(c+1)·m] U[c·m:(c+1)·m, :]`."""
from __future__ import annotations

import torch

from decomp_hooks.component_model import ComponentModel
from decomp_hooks.components import SiteComponents, SiteMask, intervention_mask
from decomp_hooks.config import ConfigError
from decomp_hooks.methods.apd.config import APDConfig
from decomp_hooks.sites import Site


def site_rank(site: Site, apd: APDConfig) -> int:
    """m for one site: `apd.rank`, or full rank min(d_in, d_out) when it is None."""
    return apd.rank if apd.rank is not None else min(site.d_in, site.d_out)


def n_components(apd: APDConfig, C: dict[str, int]) -> int:
    """APD's C: `apd.C`, else the one C every target names."""
    if apd.C is not None:
        return apd.C
    values = set(C.values())
    if len(values) != 1:
        raise ConfigError(f"APD components span every site, so the targets need one common C (got {sorted(values)}); or set apd.C.")
    return values.pop()


def apd_layout(sites: list[Site], C: dict[str, int], apd: APDConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Rank-one columns per site (C·m) and the rank m per site, for `ComponentModel(..., group_size=ranks)`."""
    n = n_components(apd, C)
    ranks = {s.name: site_rank(s, apd) for s in sites}
    return {s.name: n * ranks[s.name] for s in sites}, ranks


def groups(comps: SiteComponents) -> tuple[int, int]:
    """(number of components, rank m) of one site."""
    return comps.C // comps.group_size, comps.group_size


def expand(mask: torch.Tensor, m: int) -> torch.Tensor:
    """A per-component mask `[..., C]` as the per-column mask `[..., C·m]` of the shared forward."""
    return mask.repeat_interleave(m, dim=-1) if m > 1 else mask


def component_outputs(comps: SiteComponents, x: torch.Tensor) -> torch.Tensor:
    """Each component's contribution to the site output, `x P_c` (bias excluded): `[..., C, d_out]`."""
    C, m = groups(comps)
    inner = comps.inner_acts(x if comps.kind.reads_tokens else x.to(comps.V.dtype))
    return torch.einsum("...ck,cko->...co", inner.unflatten(-1, (C, m)), comps.U.reshape(C, m, comps.d_out))



def full_masks(cm: ComponentModel) -> dict[str, SiteMask]:
    """Every component on at every site, no delta: the APD model `Σ_c P_c`."""
    return {n: SiteMask(torch.ones((), device=cm.component(n).V.device)) for n in cm.site_names}



def component_weights(comps: SiteComponents) -> torch.Tensor:
    """The C component matrices of one site, `P_{c}` in canonical orientation: `[C, d_out, d_in]`."""
    C, m = groups(comps)
    return torch.einsum("ick,cko->coi", comps.V.reshape(comps.d_in, C, m), comps.U.reshape(C, m, comps.d_out))


def component_masks(cm: ComponentModel, keep: list[int] | None = None, ablate: list[int] | None = None,
                    device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per-site column masks `[C·m_l]` switching whole APD components (which span every site): only `keep` on (if
    given), `ablate` off. For `Decomposition.site_masks(masks=..., delta=False)` / `.run`."""
    mask = intervention_mask(groups(cm.component(cm.site_names[0]))[0], keep, ablate, device=device)
    return {n: expand(mask, cm.component(n).group_size) for n in cm.site_names}

