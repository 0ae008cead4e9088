"""Importance probe: which (layer, role) sites would a LoRA adapter help most, per trainable parameter?

Signal (LoRA-GA's SVD-of-gradient view): at LoRA's start (B = 0) the adapted weight is W + B·A, so the first step
can move W only within a rank-r subspace. The loss decrease a rank-r update of bounded norm buys is, to first
order, ‖G_r‖_F — the norm of G's best rank-r approximation, i.e. sqrt(σ₁² + … + σ_r²) of the gradient
G = ∂L/∂W accumulated over a few batches of the user's own data. A site costs r·(d_in + d_out) trainable
parameters, so its *efficiency* is ‖G_r‖_F / (r·(d_in + d_out)).

How G is computed without weight gradients for the whole model: the base weights stay frozen; a forward hook keeps
each probed module's input X [tokens, d_in] and a hook on its output collects dY = ∂L/∂Y [tokens, d_out] in the
backward, so G += dYᵀ·X [d_out, d_in]. Sites are probed in groups whose G matrices fit ``memory_budget_bytes``;
a model too big for one group is probed in several passes over the same batches.

Expert sites (a fused [E, out, in] stack, or the same linear of E expert modules) and parameter sites (a router
weight) have no per-site module output to hook, so their G is the weight gradient itself: the tensor is made to
require grad for its pass and its ``.grad`` summed in fp32. An expert site is **one site per (layer, role),
aggregated over its experts**, because that is what a placement adapts (PEFT gives every expert its own rank-r
pair; a placement cannot pick experts). Its spectrum is the per-index sum over experts of σ_{e,i}², so
``value(r) = sqrt(Σ_e Σ_{i≤r} σ_{e,i}²)`` is the first-order gain of a rank-r update on every expert, and its price
is E·r·(d_in + d_out).

A second, forward-only measure (:func:`nfn_model`): PLoP's *normalized feature norm* (Hayou, Ghosh, Yu, ICLR
2026; official code ``src/metrics.py::calculate_nfn_scores``). For a linear with weight W [d_out, d_in] and token
inputs z: Ŵ = W / rms(W), ẑ = z / ‖z‖; ``actual`` = mean over tokens of ‖Ŵẑ‖ / √d_in; ``random`` = the same with
ẑ a normalised Gaussian vector; NFN = actual / random. A low NFN means the module's input features are no better
aligned with its weight than noise — PLoP adapts the lowest-scoring module types. Where we differ from the
official code: padding positions are excluded (it averages over every position of a padded batch, so its score
depends on how much padding a batch has); ``actual`` is averaged over batches and divided by one random baseline
per site (the official code draws one Gaussian per token and averages the per-batch ratios: the same expectation,
since the baseline is a constant of W, for one forward pass per batch instead of three); the Gaussian draws are
seeded; the batches are the gradient probe's (seeded samples of the training split, prompt and response) rather
than questions alone.

A third measure (:func:`warmup_scores`, the ``warmup`` method): rank-r adapters on every linear are trained a few
steps together by our own loop (:meth:`loraplace.trial.Session.probe`), then each site is scored by its relative
update ‖s·B·A·x‖ / ‖W·x + b‖ over real tokens — LoRA-drop's output view (Zhou et al. 2024), read after training
has started rather than at B = 0. Both forward-hook measures share :class:`RealTokens`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplace.data import TokenizedSet
from loraplace.data.batching import batching_mode, make_batch
from loraplace.errors import PlacementError
from loraplace.placement.roles import ROUTER_ROLES, AdaptableModule, ArchitectureMap
from loraplace.placement.spec import TOP_METHODS, AutoPlacement, PlacementSpec, SiteGroup
from loraplace.records import ProbeScores, ProbeSite
from loraplace.stepper import batch_order
from loraplace.train import autocast, loss_sum

SPECTRUM_KEEP = 128  # singular values kept per site: ranks above this are priced as buying nothing more


def _site_groups(sites: list[AdaptableModule], memory_budget_bytes: int) -> list[list[AdaptableModule]]:
    groups: list[list[AdaptableModule]] = [[]]
    used = 0
    for site in sites:
        size = 4 * site.experts * site.in_features * site.out_features  # fp32 G
        if groups[-1] and used + size > memory_budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(site)
        used += size
    return groups


def probe_model(model, arch: ArchitectureMap, data: TokenizedSet, *, model_ref: str = "", batches: int = 8,
                batch: int = 8, rank: int = 8, device: torch.device, dtype: torch.dtype, pad_id: int,
                packing: bool = True, seed: int = 0, memory_budget_bytes: int = 2 << 30,
                progress: Callable[[int, int], None] | None = None) -> ProbeScores:
    """Score every (layer, role) site of ``model`` (frozen, no adapters) on ``batches`` batches of ``data``."""
    if len(data) == 0:
        raise PlacementError("the probe needs data: the training set is empty")
    t0 = time.perf_counter()
    sites = sorted(arch.sites.values(), key=lambda s: (s.layer, s.role))
    modules = dict(model.named_modules())
    order = batch_order(len(data), batch, batches, seed)  # the same batches in every pass
    mode = batching_mode(model, packing)
    groups = _site_groups(sites, memory_budget_bytes)
    scores: list[ProbeSite] = []
    label_tokens = 0
    was_training = model.training
    model.eval()  # no dropout: the probe measures the model as it is
    embed = model.get_input_embeddings()
    # Frozen weights: make the embedding output require grad so the backward reaches every block.
    embed_hook = embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    total_steps = len(groups) * batches
    try:
        for g_index, group in enumerate(groups):
            hooked = [s for s in group if not _by_weight(s)]
            acc = {s.path: torch.zeros(s.out_features, s.in_features, dtype=torch.float32, device=device)
                   for s in hooked}
            hooks = [modules[s.path].register_forward_hook(_grad_hook(acc[s.path])) for s in hooked]
            weights = {s.path: _site_weights(model, s) for s in group if _by_weight(s)}
            weight_acc = {path: [torch.zeros(w.shape, dtype=torch.float32, device=device) for w in ws]
                          for path, ws in weights.items()}
            for ws in weights.values():
                for w in ws:
                    w.requires_grad_(True)
            try:
                for step, index in enumerate(order):
                    b = make_batch(data, index, mode, pad_id).to(device)
                    with autocast(device, dtype):
                        loss = loss_sum(model, b)
                    loss.backward()  # hooks fill acc; only the weight-probed sites keep a .grad
                    for path, ws in weights.items():
                        for w, a in zip(ws, weight_acc[path], strict=True):
                            a.add_(w.grad.float())
                            w.grad = None
                    if g_index == 0:
                        label_tokens += b.label_tokens
                    if progress is not None:
                        progress(g_index * batches + step + 1, total_steps)
            finally:
                for h in hooks:
                    h.remove()
                for ws in weights.values():
                    for w in ws:
                        w.requires_grad_(False)
                        w.grad = None
            # Scored right after its pass, so only one group's G matrices are ever held.
            scores += [_score(site, acc.pop(site.path) if site.path in acc
                              else _expert_matrices(site, weight_acc.pop(site.path)), label_tokens, rank)
                       for site in group]
    finally:
        embed_hook.remove()
        model.train(was_training)

    return ProbeScores(model=model_ref, rank=rank, batches=len(order), label_tokens=label_tokens,
                       seconds=time.perf_counter() - t0, passes=len(groups), num_layers=arch.num_layers,
                       roles=arch.grid_roles(), sites=tuple(scores))


NFN_RANDOM_SAMPLES = 2048  # Gaussian inputs per site for the random baseline (a constant of W: sampled once)


@torch.no_grad()
def nfn_model(model, arch: ArchitectureMap, data: TokenizedSet, *, model_ref: str = "", batches: int = 8,
              batch: int = 8, rank: int = 8, device: torch.device, dtype: torch.dtype, pad_id: int, seed: int = 0,
              progress: Callable[[int, int], None] | None = None) -> ProbeScores:
    """PLoP's normalized feature norm of every linear site (see the module docstring), from forward passes over
    ``batches`` padded batches of ``data`` (the gradient probe's seeded samples). An expert site scores each expert
    linear on the tokens routed to it and averages them. ``rank`` only prices the sites (``ProbeSite.params``).

    Cost: one forward per batch. ``actual`` reads the module's own output (Wz = y − b, so no second product), and
    the random baseline — E‖Ŵĝ‖ over unit Gaussian ĝ, a constant of W — is sampled once per linear
    (``NFN_RANDOM_SAMPLES`` inputs) instead of once per token as the official code does."""
    if len(data) == 0:
        raise PlacementError("the probe needs data: the training set is empty")
    require_linear_sites(arch, "nfn", "by their inputs")
    t0 = time.perf_counter()
    sites = sorted(arch.sites.values(), key=lambda s: (s.layer, s.role))
    scored = [s for s in sites if not s.parameter]  # routers: shown unscored, never allocated
    modules = dict(model.named_modules())
    generator = torch.Generator(device="cpu").manual_seed(seed)  # the Gaussian baseline, reproducible
    linears = {p: s for s in scored for p in (s.expert_paths or (s.path,))}  # hooked linear → its site
    random: dict[str, float] = {}
    rms: dict[str, torch.Tensor] = {}  # once per linear, not per batch
    for p in linears:  # one dequantized weight at a time (a 4-bit base never holds all of them dense)
        weight = _dense_weight(modules[p])
        random[p], rms[p] = _nfn_random(weight, linears[p].conv1d, generator), _weight_rms(weight)
    actual: dict[str, list[float]] = {s.path: [] for s in scored}  # site → per batch (mean over its linears)
    current: dict[str, list[float]] = {}
    real = RealTokens()

    def hook(path: str):
        site, module = linears[path], modules[path]

        def forward_hook(_module, inputs, output):
            z, y = real.select(inputs[0]), real.select(output)
            if z.shape[0] == 0:  # an expert no real token was routed to
                return
            current.setdefault(site.path, []).append(_nfn_actual(module, z, y, rms[path]))

        return forward_hook

    def batch_done() -> None:
        for path, values in current.items():  # an expert site: the mean over the experts that saw tokens
            actual[path].append(sum(values) / len(values))
        current.clear()

    order = batch_order(len(data), batch, batches, seed)
    _, label_tokens = real.run(model, data, order, pad_id=pad_id, device=device, dtype=dtype,
                               hooks=[(modules[p], hook(p)) for p in linears], batch_done=batch_done,
                               progress=progress)
    out = []
    for s in sites:
        values = actual.get(s.path, [])
        paths = [p for p in (s.expert_paths or (s.path,)) if p in random]
        base = sum(random[p] for p in paths) / len(paths) if paths else math.nan
        mean_actual = sum(values) / len(values) if values else math.nan
        out.append(ProbeSite(layer=s.layer, role=s.role, path=s.path, in_features=s.in_features,
                             out_features=s.out_features, experts=s.experts, score=mean_actual / base,
                             grad_norm=0.0, rank=rank, actual=mean_actual if values else None,
                             random=base if paths else None))
    return ProbeScores(measure="nfn", model=model_ref, rank=rank, batches=len(order), label_tokens=label_tokens,
                       seconds=time.perf_counter() - t0, passes=1, num_layers=arch.num_layers,
                       roles=arch.grid_roles(), sites=tuple(out))


def require_linear_sites(arch: ArchitectureMap, method: str, how: str) -> None:
    """Refuse a model whose sites include fused expert stacks: a forward-hook measure reads linear modules."""
    fused = [s.path for s in arch.sites.values() if s.parameter and s.role not in ROUTER_ROLES]
    if fused:
        raise PlacementError(f"{method} scores linear modules {how}; {len(fused)} site(s) of this model are fused "
                             f"weight tensors with no per-expert input to read (e.g. {fused[0]})",
                             "use auto method probe or gradient for this model")


def warmup_sites(arch: ArchitectureMap) -> list[AdaptableModule]:
    """The sites the warmup measure adapts and scores — every linear site; routers are shown unscored and never
    allocated — or a refusal, before anything trains, of a model whose experts carry one adapter each."""
    require_linear_sites(arch, "warmup", "by their adapters' outputs")
    experts = [s.path for s in arch.sites.values() if s.expert_paths]
    if experts:
        raise PlacementError(f"warmup scores one adapter per site; {len(experts)} site(s) of this model are expert "
                             f"groups with one adapter per expert (e.g. {experts[0]})",
                             "use auto method probe or gradient for this model")
    return sorted((s for s in arch.sites.values() if not s.parameter), key=lambda s: (s.layer, s.role))


class RealTokens:
    """No-grad forwards over padded batches for the forward-hook measures (nfn, warmup), whose hooks read real
    tokens only: :meth:`select` keeps the rows of the batch in flight that are not padding."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, T] real tokens of the batch in flight

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The real-token rows of an activation: [B, T, d] or flattened [B·T, d] → [real tokens, d]; any other
        row count (an expert's routed tokens, already real) passes unchanged."""
        if t.ndim == 3:
            return t[self.mask]
        return t[self.mask.reshape(-1)] if t.shape[0] == self.mask.numel() else t

    @torch.no_grad()
    def run(self, model, data: TokenizedSet, order: list, *, pad_id: int, device: torch.device, dtype: torch.dtype,
            hooks: list[tuple[torch.nn.Module, Callable]], batch_done: Callable[[], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """One forward per batch of ``order`` (example indices), right-padded to its longest example — the
        attention mask keeps padding out of every real token — with ``hooks`` ((module, forward hook)) registered
        and the model in eval mode for the passes; ``batch_done()`` after each. → (real tokens, label tokens)."""
        tokens = label_tokens = 0
        was_training = model.training
        model.eval()
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        try:
            for step, index in enumerate(order):
                rows = [data.ids[i] for i in index]
                ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
                mask = torch.zeros(ids.shape, dtype=torch.bool)
                for i, r in enumerate(rows):
                    ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
                    mask[i, :len(r)] = True
                self.mask = mask.to(device)
                tokens += int(mask.sum())
                label_tokens += int(sum(len(data.ids[i]) - int(data.prompt_lens[i]) for i in index))
                with autocast(device, dtype):
                    model(input_ids=ids.to(device), attention_mask=self.mask.long())
                if batch_done is not None:
                    batch_done()
                if progress is not None:
                    progress(step + 1, len(order))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return tokens, label_tokens


@torch.no_grad()
def warmup_scores(peft_model, arch: ArchitectureMap, data: TokenizedSet, *, model_ref: str = "", batches: int = 8,
                  batch: int = 8, rank: int = 8, device: torch.device, dtype: torch.dtype, pad_id: int,
                  warmup_steps: int, warmup_lr: float, train_seconds: float = 0.0, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> ProbeScores:
    """Score every linear site by how far its warmed-up adapter moved the module's output (LoRA-drop's output
    view, Zhou et al. 2024): ``peft_model`` carries rank-``rank`` LoRA on every site, already trained
    ``warmup_steps`` steps together (:meth:`loraplace.trial.Session.probe`). Over the gradient probe's seeded
    batches (padding excluded): update_norm = mean ‖s·B·A·x‖ (the adapter's output, s its scaling), output_norm =
    mean ‖W·x + b‖ (the frozen module's), score = update_norm / output_norm, highest adapted first.

    Why this is not biased towards small matrices the way gain per parameter is: AdamW moves every coordinate of B
    by about the LR a step whatever its gradient's scale, so after a few steps a site's update is large where its
    gradient's *direction* stayed consistent across batches — where training wants to go — and dividing by the
    module's own output makes a 576→192 and a 576→1,536 projection comparable. Unlike the gradient at init, it is
    read after training has started, when B ≠ 0 and the sites have interacted."""
    if len(data) == 0:
        raise PlacementError("the probe needs data: the training set is empty")
    scored = warmup_sites(arch)
    t0 = time.perf_counter()
    sites = sorted(arch.sites.values(), key=lambda s: (s.layer, s.role))
    modules = dict(peft_model.get_base_model().named_modules())  # the model's own paths, LoRA layers in place
    sums: dict[str, list[float]] = {s.path: [0.0, 0.0] for s in scored}  # site → [Σ‖ΔW·x‖, Σ‖W·x + b‖]
    real = RealTokens()

    def hooks_of(site: AdaptableModule) -> list:
        layer = modules[site.path]  # PEFT's LoRA layer wrapping the base module
        adapter = next(iter(layer.lora_B))  # the one adapter ("default")
        scaling = layer.scaling[adapter]

        def on_update(_module, _inputs, output):  # lora_B's output: B·A·x [B, T, d_out], before the scaling
            sums[site.path][0] += float(real.select(output).float().norm(dim=-1).sum()) * scaling

        def on_base(_module, _inputs, output):  # the frozen module: W·x + b [B, T, d_out]
            sums[site.path][1] += float(real.select(output).float().norm(dim=-1).sum())

        return [(layer.lora_B[adapter], on_update), (layer.base_layer, on_base)]

    order = batch_order(len(data), batch, batches, seed)
    tokens, label_tokens = real.run(peft_model, data, order, pad_id=pad_id, device=device, dtype=dtype,
                                    hooks=[h for s in scored for h in hooks_of(s)], progress=progress)
    out = []
    for s in sites:
        update, output = (x / max(tokens, 1) for x in sums[s.path]) if s.path in sums else (math.nan, math.nan)
        out.append(ProbeSite(layer=s.layer, role=s.role, path=s.path, in_features=s.in_features,
                             out_features=s.out_features, experts=s.experts, score=update / (output + 1e-12),
                             grad_norm=0.0, rank=rank, update_norm=None if s.parameter else update,
                             output_norm=None if s.parameter else output))
    return ProbeScores(measure="warmup", model=model_ref, rank=rank, batches=len(order), label_tokens=label_tokens,
                       seconds=train_seconds + time.perf_counter() - t0, passes=1, num_layers=arch.num_layers,
                       roles=arch.grid_roles(), sites=tuple(out), warmup_steps=warmup_steps, warmup_lr=warmup_lr)


def _dense_weight(module) -> torch.Tensor:
    """A linear's weight as numbers: a bitsandbytes 4-bit weight (a QLoRA base) dequantized, as its forward uses
    it; other weights as they are."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state)
    if type(module).__name__ == "Linear8bitLt":
        raise PlacementError("nfn on an int8 base is not supported", "use nf4/fp4, or auto method probe/gradient")
    return weight


def _weight_rms(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().pow(2).mean().sqrt() + 1e-8


def _nfn_actual(module, z: torch.Tensor, y: torch.Tensor, weight_rms: torch.Tensor) -> float:
    """Mean over tokens of ‖Ŵẑ‖/√d_in, from the linear's input z [N, d_in] and output y [N, d_out]: Wz = y − b, so
    ‖Ŵẑ‖ = ‖y − b‖ / (rms(W)·‖z‖). (GPT-2's Conv1D computes zW + b with W [d_in, d_out]: the same identity.)"""
    z, y = z.float(), y.float()
    bias = getattr(module, "bias", None)
    if bias is not None:
        y = y - bias.float()
    norms = y.norm(dim=1) / (weight_rms * (z.norm(dim=1) + 1e-8))
    return norms.mean().item() / math.sqrt(z.shape[1])


def _nfn_random(weight: torch.Tensor, conv1d: bool, generator: torch.Generator) -> float:
    """E‖Ŵĝ‖/√d_in over unit Gaussian inputs ĝ (PLoP's random baseline), from ``NFN_RANDOM_SAMPLES`` samples."""
    w = weight.float()
    w = (w.T if conv1d else w) / _weight_rms(weight)  # Ŵ [d_out, d_in], rms 1
    d_in = w.shape[1]
    g = torch.randn(NFN_RANDOM_SAMPLES, d_in, generator=generator).to(w.device)
    g = g / g.norm(dim=1, keepdim=True)
    return (g @ w.T).norm(dim=1).mean().item() / math.sqrt(d_in)


def _by_weight(site: AdaptableModule) -> bool:
    """Probed through its weight gradient (experts, parameters), not a module hook."""
    return site.parameter or bool(site.expert_paths)


def _site_weights(model, site: AdaptableModule) -> list[torch.Tensor]:
    """The base tensors of a weight-probed site: the parameter itself, or each expert linear's weight."""
    return [model.get_parameter(path) for path in site.weight_paths]


def _expert_matrices(site: AdaptableModule, grads: list[torch.Tensor]) -> torch.Tensor:
    """The per-expert gradients [E, d_out, d_in] of a weight-probed site (a 2-D router weight: E = 1)."""
    if site.expert_paths:  # one nn.Linear weight [out, in] per expert
        return torch.stack(grads)
    g = grads[0]
    if g.ndim == 2:
        return g.unsqueeze(0)
    # a fused stack is [E, out, in], or [E, in, out] (transposed layouts): orient it like the site's shape
    return g if g.shape[1] == site.out_features else g.transpose(1, 2)


def _score(site: AdaptableModule, g_sum: torch.Tensor, label_tokens: int, rank: int) -> ProbeSite:
    g = (g_sum / max(label_tokens, 1)).double()  # gradient of the mean token loss; [out, in] or [E, out, in]
    if g.ndim == 2:
        energy = top_singular_energy(g)
    else:  # per-index sum over experts of σ_{e,i}² (see the module docstring)
        per_expert = [top_singular_energy(ge)[:SPECTRUM_KEEP] for ge in g]
        energy = torch.stack(per_expert).sum(0)
    return ProbeSite(layer=site.layer, role=site.role, path=site.path, in_features=site.in_features,
                     out_features=site.out_features, experts=site.experts, score=float(energy[:rank].sum().sqrt()),
                     grad_norm=float(energy.sum().sqrt()) if g.ndim == 2 else float(g.pow(2).sum().sqrt()),
                     rank=rank, spectrum=tuple(float(e) for e in energy[:SPECTRUM_KEEP]))


def top_singular_energy(g: torch.Tensor) -> torch.Tensor:
    """σ_i² of ``g``, largest first: eigenvalues of the smaller Gram matrix (min(d_out, d_in)² in float64), about
    5× faster than an SVD of ``g`` and as exact for the top values we use."""
    small = g if g.shape[0] <= g.shape[1] else g.T
    return torch.linalg.eigvalsh(small @ small.T).clamp_min(0).flip(0)


def _grad_hook(acc: torch.Tensor):
    def forward_hook(_module, inputs, output):
        x = inputs[0].detach()
        if not output.requires_grad:
            return

        def backward_hook(grad_out):
            # x: [B, T, d_in], grad_out: [B, T, d_out] → G += dYᵀ X : [d_out, d_in] (Conv1D stores W as [in, out];
            # we keep [out, in] for every module: the singular values are the same)
            acc.add_(grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float())

        output.register_hook(backward_hook)

    return forward_hook


# --------------------------------------------------------------------------------------------- auto placement


@dataclass(frozen=True)
class Unit:
    """What the greedy allocates rank to: one site, or every site of a role or of a layer (one shared rank)."""

    key: str  # "L3 attn.q", "attn.q" or "L3"
    sites: tuple[ProbeSite, ...]

    def value(self, rank: int) -> float:
        return sum(s.value(rank) for s in self.sites)

    def params(self, rank: int) -> int:
        return sum(s.params_at(rank) for s in self.sites)

    @property
    def max_rank(self) -> int:
        return min(min(s.in_features, s.out_features, len(s.spectrum) or 1) for s in self.sites)


def units(probe: ProbeScores, granularity: str) -> list[Unit]:
    """What an auto placement allocates over. Router weights are scored (``loraplace probe`` shows them) but never
    allocated: a router is adapted only when a placement names it."""
    candidates = [s for s in probe.sites if s.role not in ROUTER_ROLES]
    if granularity == "site":
        return [Unit(f"L{s.layer} {s.role}", (s,)) for s in candidates]
    keyf = (lambda s: s.role) if granularity == "role" else (lambda s: f"L{s.layer}")
    grouped: dict[str, list[ProbeSite]] = {}
    for s in candidates:
        grouped.setdefault(keyf(s), []).append(s)
    return [Unit(k, tuple(v)) for k, v in grouped.items()]


def allocate(probe: ProbeScores, budget: int, granularity: str = "site", step: int | None = None) -> dict[str, int]:
    """unit key → rank (a multiple of ``step``, default the probe rank), greedy by marginal efficiency.

    Each move raises one unit's rank by ``step``; its gain is ‖G_{k+step}‖_F − ‖G_k‖_F summed over the unit's sites
    and its cost is step·Σ(d_in + d_out). Because σ_i are sorted, gains shrink as a rank grows, so taking the best
    gain per parameter first spreads rank across sites until a site's own spectrum earns more rank. A move that does
    not fit the remaining budget retires that unit (its next moves cost the same); cheaper units still go on."""
    import heapq

    step = step or probe.rank
    pool = {u.key: u for u in units(probe, granularity)}
    ranks = {key: 0 for key in pool}
    heap: list[tuple[float, str]] = []

    def push(key: str) -> None:
        unit, k = pool[key], ranks[key]
        if k + step <= max(unit.max_rank, step):
            gain = unit.value(k + step) - unit.value(k)
            heapq.heappush(heap, (-gain / unit.params(step), key))

    for key in pool:
        push(key)
    spent = 0
    while heap:
        _, key = heapq.heappop(heap)
        cost = pool[key].params(step)
        if spent + cost > budget:
            continue  # retired: every later move of this unit costs as much
        ranks[key] += step
        spent += cost
        push(key)
    chosen = {k: r for k, r in ranks.items() if r}
    if not chosen:
        cheapest = min(u.params(step) for u in pool.values())
        raise PlacementError(f"budget {budget:,} is smaller than the cheapest {granularity} at rank {step} "
                             f"({cheapest:,} trainable parameters)", "raise the budget or lower auto.rank")
    return chosen


def allocate_random(probe: ProbeScores, budget: int, granularity: str = "site", step: int | None = None,
                    seed: int = 0) -> dict[str, int]:
    """The control for the probe: units in a seeded random order, each at rank ``step`` while the budget allows.
    Same allocation pattern as :func:`allocate` (one step per unit), with the ranking taken away."""
    import random

    step = step or probe.rank
    pool = units(probe, granularity)
    random.Random(seed).shuffle(pool)
    chosen, spent = {}, 0
    for unit in pool:
        if spent + unit.params(step) <= budget:
            chosen[unit.key] = step
            spent += unit.params(step)
    if not chosen:
        raise PlacementError(f"budget {budget:,} is smaller than any {granularity} at rank {step}",
                             "raise the budget or lower auto.rank")
    return chosen


def unscored(arch: ArchitectureMap, rank: int, model_ref: str = "") -> ProbeScores:
    """Every site with no score: what ``method: random`` allocates over (no probe is run)."""
    sites = tuple(ProbeSite(layer=s.layer, role=s.role, path=s.path, in_features=s.in_features,
                            out_features=s.out_features, experts=s.experts, score=0.0, grad_norm=0.0, rank=rank)
                  for s in sorted(arch.sites.values(), key=lambda s: (s.layer, s.role)))
    return ProbeScores(model=model_ref, rank=rank, batches=0, label_tokens=0, seconds=0.0, passes=0,
                       num_layers=arch.num_layers, roles=arch.grid_roles(), sites=sites)


def ranked_units(probe: ProbeScores, granularity: str, method: str) -> list[tuple[Unit, float]]:
    """(unit, its score) best first, for the methods that adapt the top units: ``nfn`` — the mean NFN of the
    unit's sites, lowest first (PLoP: inputs least aligned with the weights gain most from an adapter);
    ``gradient`` — the mean ‖G_r‖_F of its sites, highest first, with no division by the unit's size (AdamW moves
    every coordinate by about the LR whatever its gradient's scale, so gain per parameter favours small matrices
    for their size alone); ``warmup`` — the mean relative update of its sites after the warm-up, highest first.
    Ties keep the architecture's order."""
    if probe.measure != method:
        raise PlacementError(f"method {method} ranks {method} scores; these are {probe.measure} scores")
    scored = [(u, sum(s.score for s in u.sites) / len(u.sites)) for u in units(probe, granularity)]
    scored = [(u, v) for u, v in scored if math.isfinite(v)]
    return sorted(scored, key=lambda uv: uv[1] if method == "nfn" else -uv[1])


def compile_auto(placement: PlacementSpec, probe: ProbeScores, budget: int | None = None) -> PlacementSpec:
    """The auto placement as an ordinary one: groups of (role, layers, rank), so it resolves like any other
    placement and ``loraplace plan`` shows exactly what was chosen. For ``nfn``, ``gradient`` and ``warmup`` the
    groups carry no rank: the placement has the budget, and resolving it solves one rank over the chosen sites (and
    fills the budget as the study's ``fill`` says)."""
    auto: AutoPlacement = placement.auto
    budget = budget if budget is not None else auto.budget
    if budget is None:
        raise PlacementError("an auto placement needs a budget", "give auto: {budget: N} or a study budget:")
    keep = dict(alpha_ratio=placement.alpha_ratio, alpha=placement.alpha, dropout=placement.dropout,
                variant=placement.variant, eva_rho=placement.eva_rho)
    if auto.method in TOP_METHODS:
        ranked = ranked_units(probe, auto.granularity, auto.method)
        if auto.top > len(ranked):
            raise PlacementError(f"auto top {auto.top}: this model has only {len(ranked)} scored "
                                 f"{auto.granularity}(s)", f"lower auto.top to at most {len(ranked)}")
        layers_of: dict[str, list[int]] = {}
        for unit, _ in ranked[:auto.top]:
            for s in unit.sites:
                layers_of.setdefault(s.role, []).append(s.layer)
        role_order = list(probe.roles)
        groups = [SiteGroup(roles=[role], layers=",".join(map(str, sorted(layers))))
                  for role, layers in sorted(layers_of.items(), key=lambda kv: role_order.index(kv[0]))]
        return PlacementSpec(groups=groups, budget=budget, **keep)
    if auto.method == "random":
        chosen = allocate_random(probe, budget, auto.granularity, auto.rank)
    else:
        chosen = allocate(probe, budget, auto.granularity, auto.rank)
    pool = {u.key: u for u in units(probe, auto.granularity)}
    layers_by: dict[tuple[str, int], list[int]] = {}  # (role, rank) → layers
    for key, rank in chosen.items():
        for s in pool[key].sites:
            layers_by.setdefault((s.role, rank), []).append(s.layer)
    role_order = list(probe.roles)
    groups = [SiteGroup(roles=[role], layers=",".join(map(str, sorted(layers))), rank=rank)
              for (role, rank), layers in sorted(layers_by.items(), key=lambda kv: (role_order.index(kv[0][0]),
                                                                                    kv[0][1]))]
    return PlacementSpec(groups=groups, **keep)
