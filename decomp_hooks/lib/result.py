"""The result of a LIB build: bases and pseudo-inverses per node layer, importances, edges; save/load and export.

`C[layer]` is `[d+1, k]` over the node activation with a constant 1 appended (last coordinate); direction 0 is the
constant. LIB features are `f̂ = [f, 1] C`, and `f̂ C⁺` gives `[f, 1]` back on the kept subspace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from decomp_hooks import store
from decomp_hooks.config import from_dict
from decomp_hooks.lib.basis import with_constant
from decomp_hooks.lib.config import LIBConfig

FORMAT = "decomp-hooks/lib"
TENSORS, META = "lib.safetensors", "lib.json"


@dataclass
class LIBResult:
    """Bases (`C`, `C_pinv`), importances (`eigenvalues`: Λ for LIB, Gram eigenvalues for PCA), node means and
    edges (`edges[i]` `[k_{i+1}, k_i]` between `layers[i]` and `layers[i+1]`) of one build."""

    layers: list[str]
    members: list[list[str]]
    widths: list[list[int]]
    last_only: list[bool]
    C: dict[str, Tensor]
    C_pinv: dict[str, Tensor]
    eigenvalues: dict[str, Tensor]
    mean: dict[str, Tensor]
    edges: list[Tensor] = field(default_factory=list)
    config: LIBConfig = field(default_factory=LIBConfig)

    @classmethod
    def from_bases(cls, nodes: Any, bases: list, moments: list, edges: dict[int, Tensor], cfg: LIBConfig) -> LIBResult:
        names = nodes.names
        return cls(layers=list(names), members=[list(m) for m in nodes.members], widths=[list(w) for w in nodes.widths],
                   last_only=list(nodes.last_only),
                   C={n: b.C for n, b in zip(names, bases)}, C_pinv={n: b.C_pinv for n, b in zip(names, bases)},
                   eigenvalues={n: b.eigenvalues for n, b in zip(names, bases)},
                   mean={n: m.mean() for n, m in zip(names, moments)},
                   edges=[edges[i] for i in sorted(edges)], config=cfg)

    def features(self, layer: str, f: Tensor) -> Tensor:
        """LIB (or PCA) features `[..., k]` of a node activation `f [..., d]`."""
        c = self.C[layer]
        return with_constant(f).to(c) @ c

    def projector(self, layer: str, k: int | None = None) -> Tensor:
        """`C_{:,<k} C⁺_{<k,:}` `[d+1, d+1]`: the projection onto the first `k` directions (all if None)."""
        k = self.C[layer].shape[1] if k is None else k
        return self.C[layer][:, :k] @ self.C_pinv[layer][:k]

    def sizes(self) -> dict[str, int]:
        """Number of kept directions per node layer (constant included)."""
        return {n: c.shape[1] for n, c in self.C.items()}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write `lib.safetensors` + `lib.json` into directory `path`, atomically."""
        tensors = {}
        for i, name in enumerate(self.layers):
            for key, table in (("C", self.C), ("C_pinv", self.C_pinv), ("eigenvalues", self.eigenvalues),
                               ("mean", self.mean)):
                tensors[f"layer{i}.{key}"] = table[name]
        tensors.update({f"edges{i}": e for i, e in enumerate(self.edges)})
        meta = {"format": FORMAT, "layers": self.layers, "members": self.members, "widths": self.widths,
                "last_only": self.last_only, "n_edges": len(self.edges), "config": self.config.to_dict()}
        with store.atomic_dir(path, overwrite=overwrite) as tmp:
            store.write_tensors(tmp / TENSORS, tensors)
            store.write_json(tmp / META, meta)
        return Path(path)

    def export(self, path: str | Path, layer: str, format: str = "standard", overwrite: bool = False,
               **hooks: Any) -> Path:
        """One SAE-Lens directory for `layer`'s basis (constant direction excluded): encoder `C[:d, 1:]` with
        `b_enc = C[d, 1:]`, decoder `C⁺[1:, :d]` with `b_dec = C⁺[0, :d]`, so decode(encode(x)) is the projection of
        x onto the kept directions. `hooks` (hook_name, model_name, …) go to `export_basis`."""
        from decomp_hooks.export import export_basis

        if layer not in self.C:
            raise KeyError(f"layer {layer!r} is not in this LIB result; layers: {', '.join(self.layers)}.")
        c, cp = self.C[layer], self.C_pinv[layer]
        d = c.shape[0] - 1
        members = self.members[self.layers.index(layer)]
        hooks.setdefault("hook_name", members[0] if len(members) == 1 else None)
        md = {"lib_layer": layer, "lib_basis": self.config.basis, "lib_eigenvalues": self.eigenvalues[layer][1:].tolist()}
        return export_basis(path, c[:d, 1:], cp[1:, :d], b_dec=cp[0, :d], b_enc=c[d, 1:], format=format,
                            metadata=md, overwrite=overwrite, **hooks)


def load_lib(path: str | Path) -> LIBResult:
    """Read a LIB result written by `LIBResult.save` (safetensors + JSON, nothing unpickled)."""
    root = Path(path)
    meta = store.read_json(root / META)
    if meta.get("format") != FORMAT:
        raise store.StoreError(f"{str(root / META)!r} is not a LIB result (format {meta.get('format')!r}).")
    t = store.read_tensors(root / TENSORS)
    names = meta["layers"]
    try:
        tables = {key: {n: t[f"layer{i}.{key}"] for i, n in enumerate(names)}
                  for key in ("C", "C_pinv", "eigenvalues", "mean")}
        edges = [t[f"edges{i}"] for i in range(meta["n_edges"])]
    except KeyError as err:
        raise store.StoreError(f"{str(root / TENSORS)!r} lacks tensor {err}; the directory is incomplete.") from None
    return LIBResult(layers=names, members=meta["members"], widths=meta["widths"], last_only=meta["last_only"],
                     edges=edges, config=from_dict(LIBConfig, meta["config"], where=str(root / META)), **tables)
