"""The contract every decomposition method fulfils, so the trainer, evaluation, export and toys need not know which
method they run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from decomp_hooks.component_model import ComponentModel
    from decomp_hooks.config import CIConfig, DecomposeConfig
    from decomp_hooks.decomposition import Decomposition
    from decomp_hooks.sites import Site


@dataclass
class StepOutput:
    """One training step's loss: the total to differentiate, each named term's raw value (logged as `train/<name>`),
    the per-group importances `[..., C]` the step used (logged as L0), and anything else worth logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    importances: dict[str, torch.Tensor]
    log: dict[str, float] = field(default_factory=dict)


@dataclass
class Layout:
    """How a method lays components out on the sites: rank-one columns per site, how many consecutive columns form
    one component (1 for rank-one components), and the CI functions to build (None: the method has none)."""

    C: dict[str, int]
    group_size: dict[str, int]
    ci: CIConfig | None


class Method:
    """A parameter-decomposition method on a `ComponentModel`.

    Subclasses set `name` (the config's `method:` value) and, if the method has its own config section, `section`
    (the DecomposeConfig field holding it); `importance_kind` says what `importances` returns: "ci" (graded causal
    importances from CI functions) or "topk" (which components an input's top-k selection switched on).
    """

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    importance_kind: ClassVar[str] = "ci"

    def __init__(self, cfg: DecomposeConfig, world_size: int = 1):
        from decomp_hooks.config import micro_batches

        self.cfg, self.world_size = cfg, world_size
        #: the pieces one global batch is computed in (ranks × micro-batches), for batch-sum terms
        self.batch_shards = world_size * micro_batches(cfg.train, world_size)

    # -- configuration and layout ---------------------------------------------------------------------------------

    @classmethod
    def validate(cls, cfg: DecomposeConfig) -> None:
        """Raise ConfigError for settings this method cannot run with (the common sections are checked already)."""

    @classmethod
    def check_trainable(cls, cfg: DecomposeConfig) -> None:
        """Raise ConfigError if a valid config still lacks what training needs (e.g. SPD without loss terms)."""

    @classmethod
    def resolve(cls, cfg: DecomposeConfig, C: dict[str, int]) -> DecomposeConfig:
        """The config with values derived from the resolved sites filled in (so a saved config names them)."""
        return cfg

    @classmethod
    def layout(cls, sites: list[Site], C: dict[str, int], cfg: DecomposeConfig) -> Layout:
        """Rank-one components, C of them per site as the targets say, each with a CI function."""
        return Layout(dict(C), {s.name: 1 for s in sites}, cfg.ci)

    # -- training -------------------------------------------------------------------------------------------------

    def init_components(self, cm: ComponentModel) -> None:
        """Initialise the components before training, if the method has its own scheme."""

    def loss(self, cm: ComponentModel, batch: Any, frac: float) -> StepOutput:
        """The loss of one step at training-progress fraction `frac` ∈ [0, 1]."""
        raise NotImplementedError

    def after_backward(self, cm: ComponentModel) -> None:
        """Adjust gradients between backward and the optimizer step."""

    def after_step(self, cm: ComponentModel) -> None:
        """Adjust parameters after the optimizer step."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State the method keeps across steps besides the model and optimizer (checkpointed per rank)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned, on resume."""

    def evaluate(self, cm: ComponentModel, batch: Any) -> dict[str, float]:
        """Evaluation metrics on one batch (logged as `eval/<name>`)."""
        raise NotImplementedError

    # -- reading the result ---------------------------------------------------------------------------------------

    def importances(self, cm: ComponentModel, batch: Any,
                    inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per site, how much each of its rank-one columns is needed at each position: `{site: [..., C_site]}`.
        `inputs`: the sites' inputs on `batch` when the caller already ran the target (saves a forward)."""
        if inputs is None:
            _, inputs = cm(batch, cache=True)
        return {n: c.lower for n, c in cm.causal_importances(inputs).items()}

    def probe_metrics(self, dec: Decomposition, probes: torch.Tensor) -> dict[str, float]:
        """Method-specific metrics on ground-truth probe inputs (the toys' one-hot features)."""
        return {}
