"""The PEFT boundary: a trial's adapter tensors read out of PEFT's LoRA layers, and written back into them.

A site of a :class:`~loraplace.placement.Plan` (a linear, a parameter target, the head) is one PEFT LoRA layer
(:func:`peft_site`); its trainable tensors travel as a :class:`SiteWeights` record — A, B and, for DoRA, the
magnitude vector — in PEFT's own layout, so what the fused engine trained loads into a PEFT model injected with
the same plan (:func:`load_weights`) and saves as a standalone PEFT adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from loraplace.errors import TrialFailed
from loraplace.placement.plan import Plan
from loraplace.stepper import TrainOutcome


@dataclass(frozen=True)
class SiteWeights:
    """One site's trainable LoRA tensors in PEFT's layout: ``lora_A`` [r·E, in], ``lora_B`` [out, r·E] (E experts on
    an expert-stack parameter, else 1), DoRA's ``magnitude`` [out] (None for every other variant). Iterates as
    (A, B[, magnitude]), the order :meth:`names` gives."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.lora_A, self.lora_B) + (() if self.magnitude is None else (self.magnitude,))

    def detached(self) -> SiteWeights:
        """Copies, cut from the graph (what outlives the live parameters)."""
        return SiteWeights(*(t.detach().clone() for t in self.tensors()))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors())

    def __len__(self) -> int:
        return len(self.tensors())

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors()[i]

    @staticmethod
    def names(path: str, dora: bool) -> list[str]:
        """The names of a site's tensors in a saved trainer state (``path:lora_A`` …)."""
        return [f"{path}:lora_A", f"{path}:lora_B"] + ([f"{path}:magnitude"] if dora else [])


@dataclass(frozen=True)
class ParamLayout:
    """How PEFT lays out the LoRA of a parameter target (``ParamWrapper``): experts in the stack, whether in/out
    are swapped for it, and ``fan_in_fan_out``."""

    experts: int
    swapped: bool
    fan_in_fan_out: bool


@dataclass(frozen=True)
class SiteInit:
    """A site's adapters as PEFT initialised them: the tensors, the LoRA scale (alpha / r, or rsLoRA's), and for a
    parameter target its layout."""

    weights: SiteWeights
    scale: float
    layout: ParamLayout | None = None


def peft_site(inner, path: str):
    """PEFT's LoRA layer of a site: the module at ``path``, or, for a parameter target (``owner.name``), the
    ``ParamWrapper`` of that parameter (wrappers of one module's parameters are nested through ``base_layer``).
    ``inner``: the PEFT model's wrapped model (``peft_model.base_model.model``)."""
    try:
        module = inner.get_submodule(path)
        if hasattr(module, "lora_A"):
            return module
    except AttributeError:
        pass
    owner, _, name = path.rpartition(".")
    module = inner.get_submodule(owner)
    while hasattr(module, "parameter_name"):
        if module.parameter_name == name:
            return module
        module = module.base_layer
    raise KeyError(f"{path}: no PEFT LoRA layer adapts it")


def _site_tensors(layer) -> SiteWeights:
    """The live (trainable) tensors of a PEFT LoRA layer's default adapter."""
    magnitude = layer.lora_magnitude_vector["default"].weight \
        if "default" in getattr(layer, "lora_magnitude_vector", {}) else None
    return SiteWeights(layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude)


def named_tensors(sites: Mapping[str, SiteWeights]) -> tuple[list[torch.Tensor], list[str]]:
    """The sites' tensors in order (path by path: A, B[, magnitude]) and their names: the order and names a trainer
    state is saved with, whichever engine trains the trial."""
    params, names = [], []
    for path, weights in sites.items():
        params += weights.tensors()
        names += SiteWeights.names(path, weights.magnitude is not None)
    return params, names


def site_parameters(peft_model, plan: Plan) -> tuple[list[torch.nn.Parameter], list[str]]:
    """The trainable tensors of a PEFT model injected with ``plan``, in plan order, and their names
    (:func:`named_tensors`)."""
    inner = peft_model.base_model.model
    return named_tensors({pm.path: _site_tensors(peft_site(inner, pm.path)) for pm in plan.modules})


def read_sites(peft_model, plan: Plan) -> dict[str, SiteInit]:
    """Copies of every site's adapters as PEFT holds them now (after its init: the trial's seed, EVA's SVD …)."""
    inner = peft_model.base_model.model
    out = {}
    for pm in plan.modules:
        layer = peft_site(inner, pm.path)
        weights = _site_tensors(layer).detached()
        layout = ParamLayout(int(layer.num_experts), bool(layer._did_swap_in_out_features),
                             bool(layer.fan_in_fan_out)) if pm.parameter else None
        out[pm.path] = SiteInit(weights, float(layer.scaling["default"]), layout)
    return out


def load_weights(peft_model, weights: Mapping[str, SiteWeights]) -> None:
    """Put trained adapters (path → :class:`SiteWeights`) into a PEFT model injected with the same plan."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for path, trained in weights.items():
            layer = peft_site(inner, path)
            live = _site_tensors(layer)
            if live.lora_A.shape != trained.lora_A.shape:  # e.g. an EVA init that chose other ranks
                raise TrialFailed(f"{path}: the fused trial trained rank {trained.rank}, the re-injected adapter "
                                  f"has rank {live.rank}")
            if (live.magnitude is None) != (trained.magnitude is None):
                raise TrialFailed(f"{path}: DoRA's magnitude vector on one side only (trained "
                                  f"{'with' if trained.magnitude is not None else 'without'} it)")
            for target, value in zip(live.tensors(), trained.tensors(), strict=True):
                target.copy_(value)


@dataclass(frozen=True)
class TrainedAdapters:
    """A trial's adapters trained outside its own PEFT model (in a fused group), with what the training recorded:
    what ``trial.run_trial`` needs to evaluate, save and report the trial as if it had trained alone."""

    outcome: TrainOutcome
    weights: Mapping[str, SiteWeights]  # site path → trained tensors; empty when the trial failed
    plan: Plan  # the plan as PEFT built it (EVA's ranks): re-injected as it is, without redoing EVA's SVD
    failure: TrialFailed | None = None
    group_size: int = 1  # trials trained in the same pass, this one included
    eval_losses: Mapping[str, tuple[float, int]] = field(default_factory=dict)  # split → (loss, label tokens)
    eval_s: float = 0.0  # the group's final fused eval time
    peak_mem_mb: float = 0.0  # the group's peak memory while it trained (and evaluated), MiB
