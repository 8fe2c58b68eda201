"""MoA-style (domain-routed): one LoRA per domain, and routers supervised by the domain label.

Based on MoA: Mixture-of-LoRAs (Feng et al., LREC-COLING 2024), https://arxiv.org/abs/2403.03432 .
Only the paper's abstract was available, so this is our interpretation (docs/interpretations.md),
not a reproduction: "MoA-style (domain-routed)".

    stage 1, per domain j:  y = W0 x + (alpha / r) B_j A_j x, trained on D_j alone
    stage 2, sequence b:    p_b = softmax(W_r mean_{t < P} x_b[t]),  W_r (E, I)
                            training:  k_b = the gold domain (teacher forcing)
                                       L = L_LM + lambda * mean over layers of CE(p_b, k_b)
                            inference: k_b = argmax p_b
                            y_t = W0 x_t + (alpha / r) B_{k_b} A_{k_b} x_t, every token t of b

Legend: E = n, one LoRA per domain; P prompt positions pooled (tasks.py: task token, digits, SEP).
A batch that mixes domains runs without a loop over sequences: dispatch_gathered gathers each
sequence's A and B and uses batched matmuls, one LoRA's work per token (dispatch_fused with
one-hot gates would do E times that); forward_naive is the loop over experts with one-hot gates.
Option routing="token" (docs/interpretations.md): a soft softmax router per token, trained with the
LM loss plus each token's CE against its sequence's domain, and used as weights at inference.
With token_input="prefix" (the default) a token's router reads the mean of the layer's input over
the positions up to it (causal, so generation sees the same), the task token among them;
token_input="token" reads the token's own input. A token's own input in the first block's q, k, v
is its embedding and position only, where a digit looks the same in every domain, so those
routers cannot beat chance there (README, "Default runs").
For a fixed domain, `merge` folds B_j A_j into W0 (serving one domain, as MOELoRA merges a task),
and `extract_domain` makes LoRA j a plain LoRA layer again (for lora.save_peft). `from_loras`
builds a MoA from LoRAs trained elsewhere (lora.read_peft), leaving only the routers to train.

Not included: stage 2 fine-tuning of the LoRAs (the paper does not settle it); LoRA dropout.
Deviations (all unverified design choices): one router per adapted linear reading
that layer's own input; the layers' CEs are averaged, not summed, so lambda
does not scale with depth. With gold routing and frozen LoRAs the LM loss has no gradient in
stage 2: only the CE trains the routers there. The paper's learning rates are not known: stage 2
trains at router_lr_scale = 10 times the LoRAs' lr, because at one shared lr the routers, linear
maps from N(0, 0.02^2), were still far from fitting the CE when the stage's steps ran out, though
the domain is linearly separable in every layer's pooled prompt; a router wrong in any one of the
layers sends the whole sequence through another LoRA there (README, "Default runs").
`--cfg router_lr_scale=1` is one lr for every stage.
"""
import copy
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (AdaptedLinear, LastCall, Router, Stage, check_config, check_field, dispatch_naive,
                    inject, is_int, is_real, lora_uniform_, route, stage_mode)


@dataclass
class MoAConfig:
    num_domains: int = 5          # E, one LoRA per domain (train.py sets it to the run's domains)
    rank: int = 8                 # r, per LoRA (rank 8 as the community reimplementation)
    alpha: float = 16.0           # scaling = alpha / r
    routing: str = "sequence"     # "sequence": one LoRA per sequence; "token": soft, per token
    prompt_len: int = 8           # P, positions the sequence router pools (train.py: L + 2)
    router_loss_coef: float = 1.0  # lambda, weight of the router CE
    stage_steps: tuple = (1.0, 0.5)    # shares of --steps: all LoRAs (stage 1), router (stage 2)
    router_lr_scale: float = 10.0      # stage 2's peak lr, a multiple of --lr (1.0: one lr for all)
    token_input: str = "prefix"   # routing="token": "prefix" mean of x up to the token, or "token"
    targets: tuple = ("q", "k", "v", "o", "up", "down")

    def __post_init__(self):
        check_config(self)            # types; E, r, P >= 1, alpha > 0
        c = "MoAConfig"
        check_field(c, "routing", self.routing, self.routing in ("sequence", "token"),
                    "'sequence' or 'token'")
        check_field(c, "router_loss_coef", self.router_loss_coef, self.router_loss_coef > 0,
                    "> 0 (with gold routing the CE is the routers' only signal)")
        check_field(c, "token_input", self.token_input, self.token_input in ("prefix", "token"),
                    "'prefix' or 'token'")
        check_field(c, "stage_steps", self.stage_steps,
                    len(self.stage_steps) == 2 and all(is_real(f) and f > 0 for f in self.stage_steps),
                    "2 shares > 0 (LoRAs, router)")


def dispatch_gathered(x, A, B, idx, scaling):
    """One LoRA per sequence: y_b = scaling * B_k A_k x_b, k = idx[b]. x (B, T, I); A (E, r, I);
    B (E, O, r); idx (B,). Gathers each sequence's A and B and applies them with batched matmuls:
    one LoRA's work per token whatever E is (dispatch_fused with one-hot gates does E times that),
    plus a copy of r (I + O) weights per sequence. No loop; torch.compile-friendly."""
    h = torch.einsum("bti,bri->btr", x, A[idx])                    # (B, T, r)
    return scaling * torch.einsum("btr,bor->bto", h, B[idx])       # (B, T, O)


class MoALinear(LastCall, AdaptedLinear):
    """Inputs are (..., T, I): the sequence router pools each sequence's first prompt_len tokens,
    so `update` gets (B, T, I) (sequence_input)."""
    sequence_input = True
    last_call = ("gold", "logits")

    def __init__(self, base: nn.Linear, cfg: MoAConfig):
        super().__init__(base)
        I, O, E, r = base.in_features, base.out_features, cfg.num_domains, cfg.rank
        self.routing, self.prompt_len, self.token_input = cfg.routing, cfg.prompt_len, cfg.token_input
        self.scaling = cfg.alpha / r
        self.lora_A = nn.Parameter(torch.empty(E, r, I))
        self.lora_B = nn.Parameter(torch.empty(E, O, r))
        self.router = Router(I, E)                       # W_r
        self.active = None      # None: routed (stage 2, inference); j: LoRA j alone (stage 1)
        self.gold = None        # (B,) domain labels of the training batch, set by stage 2
        self.logits = None      # router logits of the last routed forward: (B, E) or (N, E)
        self.reset_parameters()

    def reset_parameters(self):
        lora_uniform_(self.lora_A)                       # as the single-LoRA baseline
        nn.init.zeros_(self.lora_B)                      # B = 0 -> update = 0 -> output == base(x)
        self.router.reset_parameters()

    def _route(self, x):
        """x (B, T, I) -> gates (N, E), and idx (B,), the LoRA of each sequence (None: soft)."""
        B, T, I = x.shape
        E = self.lora_A.shape[0]
        if self.active is not None:                      # stage 1: LoRA j alone
            idx = torch.full((B,), self.active, device=x.device)
        elif self.routing == "token":                    # soft, per token
            if self.token_input == "prefix":             # mean of x[0..t] for token t, causal
                counts = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)    # (T,)
                x = x.cumsum(1) / counts[:, None]                                 # (B, T, I)
            self.logits, probs, _, _ = route(x.reshape(-1, I), self.router, E)    # (N, E)
            self.router.gates = probs.detach()           # for the expert usage
            return probs, None
        else:
            pooled = x[:, :self.prompt_len].mean(1)                  # (B, I)  mean over the prompt
            self.logits = route(pooled, self.router, E)[0]           # (B, E)  W_r mean_t x[t]
            teacher = self.training and self.gold is not None
            idx = self.gold if teacher else self.logits.argmax(-1)   # (B,) gold / argmax
        gates = F.one_hot(idx, E).to(x.dtype)[:, None].expand(B, T, E)   # (B, T, E)
        self.router.gates = gates.reshape(B * T, E)     # the one-hot of each sequence's LoRA
        return self.router.gates, idx

    def update(self, x, dispatch):
        """x (B, T, I) -> (B, T, O): each sequence's LoRA, or the soft per-token mix. The fast path
        gathers one LoRA per sequence (dispatch_gathered); the reference loop (dispatch_naive)
        runs every LoRA on every token with the one-hot gates, as for any other method."""
        gates, idx = self._route(x)                                 # (N, E), (B,) or None
        if idx is not None and dispatch is not dispatch_naive:
            return dispatch_gathered(x, self.lora_A, self.lora_B, idx, self.scaling)   # (B, T, O)
        return dispatch(x.flatten(0, 1), self.lora_A, self.lora_B, gates, self.scaling)   # (N, O)

    def router_loss(self) -> torch.Tensor:
        """CE of the last routed forward against the gold domains; token
        routing: every token against its sequence's domain."""
        gold = self.gold.repeat_interleave(self.logits.shape[0] // self.gold.shape[0])   # (B,) or (N,)
        return F.cross_entropy(self.logits, gold)

    def delta_weight(self, j: int) -> torch.Tensor:
        """Dense (O, I) update of domain j. For merging and tests, never called by forward."""
        return self.scaling * self.lora_B[j] @ self.lora_A[j]       # (O, r) @ (r, I) -> (O, I)


def _replace_layers(model: nn.Module, make: Callable[[MoALinear, str], nn.Module]) -> nn.Module:
    """Every MoALinear `layer` named `name` becomes make(layer, name). In place; returns the model."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MoALinear)]:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, make(layer, name))
    return model


def merge(model: nn.Module, j: int) -> nn.Module:
    """Serve domain j alone: every MoALinear becomes a plain nn.Linear with W0 + (alpha/r) B_j A_j.
    In place; returns the model."""
    def merged(layer, name):
        linear = copy.deepcopy(layer.base)
        with torch.no_grad():
            linear.weight += layer.delta_weight(j).to(linear.weight.dtype)
        return linear
    return _replace_layers(model, merged)


def extract_domain(model: nn.Module, j: int, layer_factory: Callable[[nn.Module, str], nn.Module]):
    """Serve domain j alone, unmerged: every MoALinear becomes layer_factory(base, name), a single
    LoRA layer with lora_A (r, I), lora_B (O, r) and this MoA's scaling, holding a copy of LoRA j,
    on the MoA's device and dtype. With lora.LoRALinear and LoRAConfig(rank, alpha) of the MoA as
    the factory, lora.save_peft then writes domain j for PEFT. (The factory keeps this file free of
    lora.py, as inject's.) In place; returns the model."""
    E = next((m.lora_A.shape[0] for m in model.modules() if isinstance(m, MoALinear)), 0)
    check_field("extract_domain", "j", j, is_int(j) and 0 <= j < E, f"a domain in 0..{E - 1}")

    def single(layer, name):
        lora = layer_factory(layer.base, name).to(layer.lora_A)
        want = (tuple(layer.lora_A.shape[1:]), tuple(layer.lora_B.shape[1:]), layer.scaling)
        have = (tuple(lora.lora_A.shape), tuple(lora.lora_B.shape), lora.scaling)
        if have != want:
            raise ValueError(f"extract_domain: {name}: the factory's layer has lora_A, lora_B, scaling "
                             f"{have}, the MoA's LoRA {want}: build it with the MoA's rank and alpha")
        with torch.no_grad():
            lora.lora_A.copy_(layer.lora_A[j])                      # (r, I)
            lora.lora_B.copy_(layer.lora_B[j])                      # (O, r)
        return lora
    return _replace_layers(model, single)


def from_loras(model: nn.Module, loras: list, cfg: MoAConfig | None = None) -> list:
    """A MoA built from trained LoRAs, LoRA j for domain j (stage 1 done elsewhere, e.g. in PEFT):
    injects MoALinear layers where the LoRAs adapt, copies them in and freezes them, so that only
    the routers train (stage 2). loras: (config, state) pairs as lora.read_peft(directory, model)
    returns them, the config with .rank and .alpha, the state {"<module path>.lora_A": (r, I),
    "<module path>.lora_B": (O, r)}. They must share rank, alpha and modules; num_domains, rank,
    alpha and targets come from them, routing and the router settings from cfg. Returns the layers."""
    if not loras:
        raise ValueError("from_loras: needs at least one LoRA, as a (config, state) pair")

    def signature(c, state):                              # what must agree for LoRAs to stack
        return c.rank, c.alpha, {k: tuple(t.shape) for k, t in state.items()}
    (cfg0, state0), first = loras[0], signature(*loras[0])
    for j, (c, state) in enumerate(loras):
        if signature(c, state) != first:
            raise ValueError(f"from_loras: LoRA {j} (rank {c.rank}, alpha {c.alpha}, {len(state)} "
                             f"tensors) differs from LoRA 0 (rank {cfg0.rank}, alpha {cfg0.alpha}, "
                             f"{len(state0)} tensors): a MoA stacks LoRAs of one rank and alpha on "
                             f"the same modules")
    modules = tuple(sorted({k.rpartition(".")[0] for k in state0}))
    cfg = replace(cfg or MoAConfig(), num_domains=len(loras), rank=cfg0.rank, alpha=cfg0.alpha,
                  targets=modules)
    layers = inject(model, lambda linear, name: MoALinear(linear, cfg).to(linear.weight), modules)
    with torch.no_grad():
        for name in modules:
            layer = model.get_submodule(name)
            for part in ("lora_A", "lora_B"):                       # (E, r, I), (E, O, r)
                getattr(layer, part).copy_(torch.stack([s[f"{name}.{part}"] for _, s in loras]))
                getattr(layer, part).requires_grad_(False)
    return layers


def moa_num_params(I: int, O: int, cfg: MoAConfig, part: str = "total") -> int:
    """Trainable parameters per adapted linear. part: "lora" (stage 1, one
    domain), "router" (stage 2) or "total"."""
    E = cfg.num_domains
    counts = {"lora": cfg.rank * (I + O), "router": E * I}
    counts["total"] = E * counts["lora"] + counts["router"]
    return counts[part]


def _set_gold(layers, domain_ids):
    for m in layers:
        m.gold = domain_ids


@torch.no_grad()
def moa_metrics(model, layers, x, domain_ids) -> dict:
    """Router accuracy on held-out sequences x (B, T) of known domains (B,): the share of
    (sequence, layer) picks, or (token, layer) argmaxes for token routing, that hit the gold domain."""
    model.eval()
    model(x)
    hits = [(m.logits.argmax(-1) == domain_ids.repeat_interleave(m.logits.shape[0] // x.shape[0]))
            .float().mean().item() for m in layers]
    return {"router_accuracy": sum(hits) / len(hits), "router_accuracy_per_layer": hits}


def moa_stages(cfg: MoAConfig, domains: tuple, general: str, new: str | None = None) -> list:
    """The two stages for train.py; `domains` are task names, LoRA j <-> domain
    j. `general` is unused: MoA has no universal expert. With `new` (a domain just appended by
    common.append_expert): stage 1 for it alone, then stage 2 again, on every domain.

    Stage 1 hands the stacked lora_A / lora_B to the optimiser; only LoRA j is gathered, so the
    others get exactly zero gradient and AdamW without weight decay leaves them bit-identical."""
    lora_frac, router_frac = cfg.stage_steps

    def router_ce(layers):                            # lambda * mean over layers of CE (Deviations)
        return cfg.router_loss_coef * torch.stack([m.router_loss() for m in layers]).mean()

    plan = [Stage(f"lora {t}", (t,), setup=stage_mode(j), steps_frac=lora_frac / len(domains),
                  params=lambda layers: [p for m in layers for p in (m.lora_A, m.lora_B)])
            for j, t in enumerate(domains) if new in (None, t)]
    plan.append(Stage("router", tuple(domains), setup=stage_mode(None), on_batch=_set_gold,
                      extra_loss=router_ce, steps_frac=router_frac, lr_scale=cfg.router_lr_scale,
                      params=lambda layers: [m.router.weight for m in layers]))
    return plan
