"""MoDULA: one universal LoRA expert and n domain experts, trained in three stages.

MoDULA: Mixture of Domain-Specific and Universal LoRA for Multi-Task Learning (Ma et al.,
EMNLP 2024), https://aclanthology.org/2024.emnlp-main.161

Flan (parallel, Fig. 1b): one router weights the universal expert * and the domain experts

    s = softmax(W_R x),  W_R (n+1, I)                                               (Eq. 5-8)
    y = W0 x + s_* c_* B_* A_* x + sum_i s_i c_i B_i A_i x

Res (serial plus residual, Fig. 1c): the domain experts read the universal update h

    h = c_* B_* A_* x                              always on, unweighted             (Eq. 9-12)
    s = softmax(W_R x),  W_R (n, I)                input x, not h
    y = W0 x + h + sum_i s_i c_i B_i LeakyReLU(A_i h),  A_i (r_d, O)

c_j = alpha / r_j, r_* = 16, r_d = 8. The three stages (§3, Fig. 2), each with its forward:
1. the universal expert alone on universal data: y = W0 x + c_* B_* A_* x;
2. each domain expert i alone on its own data, the universal one frozen:
   Flan y = W0 x + c_i B_i A_i x (Eq. 4); Res y = W0 x + h + c_i B_i LeakyReLU(A_i h), s_i = 1;
3. the routers only, with every expert frozen, on the mixture of general and domain data.
Adding a domain (§4.4): stage 2 for it alone, one more router row (the mean of the old rows,
common.append_expert), then stage 3 again; the universal and old domain experts never change.

Legend: the domain experts are the E axis (E = n); the universal expert has another rank, so it
is one LoRA computed apart, and the dispatch runs over the domain experts only.
Not included: merging (routing is per token, and Res is nonlinear in x); LoRA dropout; the
"w/o Res" ablation of Table 6.
Deviations: alpha and the LeakyReLU slope are not reported: one alpha = 16 for every expert
(c_* = 1, c_d = 2), slope 0.01 (PyTorch's default). The router's data mix is not stated: stage 3
uses the general task plus every domain, uniformly (docs/interpretations.md). The universal data
(airoboros-3.2, broad instructions, in the paper) is here that same mixture: on the general task
alone, which the base model already solves, B_* stays at its zero init, so h = 0 and Res's domain
experts, which read h, get no gradient at all. The paper trains one epoch per stage; here
stage 3 gets as many steps as all of stage 2 (stage_steps).
Interpretations for the router (stage 3), each reachable with --cfg as the paper has it:
- router_input="prompt": each layer's router reads the mean of its input over the sequence's
  prompt (the first prompt_len tokens, the task token among them) and weights every token of the
  sequence alike; router_input="token" is Eq. 5-8 per token. A per-token router in the first
  block's q, k, v reads a token and its position only, where a digit looks the same in every
  task; later inputs do carry the task, yet per-token routers trained by the LM loss alone settle
  on mixtures far from each task's own expert, while pooled ones find them (README, "Default
  runs", has the measurement). With prompt routing the layer's update sees (B, T, I).
- router_lr_scale=10: stage 3 trains at ten times the experts' lr (1: one lr for all). The
  paper's learning rates are not known; the routers start from N(0, 0.02^2) and have one short
  stage, as MoA's routers, which at one shared lr were still far from fitting (moa.py).
  On the synthetic tasks here the routers found their experts with about 600 steps at 1e-2
  (the default run's stage 3); with half of that, or at 3e-2, they settled on wrong experts in
  many layers (docs/comparison.md, which sets stage_steps and router_lr_scale accordingly for
  its shorter budget).
"""
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (AdaptedLinear, Router, Stage, check_config, check_field, is_real, lora_uniform_,
                    stage_mode)

UNIVERSAL = -1                    # MoDULALinear.active in stage 1: the universal expert alone


@dataclass
class MoDULAConfig:
    variant: str = "res"          # "flan" (parallel) or "res" (serial + residual, the paper's best)
    num_domains: int = 5          # n = E, domain experts (train.py sets it to the run's domains)
    universal_rank: int = 16      # r_*
    domain_rank: int = 8          # r_d
    alpha: float = 16.0           # c_j = alpha / r_j; alpha is not reported in the paper
    negative_slope: float = 0.01  # Res: LeakyReLU between A_i and B_i (not reported)
    stage_steps: tuple = (0.25, 1.0, 1.0)    # shares of --steps: universal, all domains, router
    router_input: str = "prompt"  # "prompt": one gate per sequence from its pooled prompt; "token"
    prompt_len: int = 8           # P, prompt positions the router pools (train.py: L + 2)
    router_lr_scale: float = 10.0  # stage 3's peak lr, a multiple of --lr (1.0: one lr for all)
    targets: tuple = ("q", "k", "v", "o", "up", "down")   # not reported; same as MoLoRA here

    def __post_init__(self):
        check_config(self)            # types; n, ranks, P >= 1, alpha, router lr > 0, slope >= 0
        c = "MoDULAConfig"
        check_field(c, "variant", self.variant, self.variant in ("flan", "res"), "'flan' or 'res'")
        check_field(c, "router_input", self.router_input, self.router_input in ("prompt", "token"),
                    "'prompt' or 'token'")
        check_field(c, "stage_steps", self.stage_steps,
                    len(self.stage_steps) == 3 and all(is_real(f) and f > 0 for f in self.stage_steps),
                    "3 shares > 0 (universal, domains, router)")


class MoDULALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: MoDULAConfig):
        super().__init__(base)
        I, O, E, r, r_u = (base.in_features, base.out_features, cfg.num_domains, cfg.domain_rank,
                           cfg.universal_rank)
        self.variant, self.prompt_len = cfg.variant, cfg.prompt_len
        self.sequence_input = cfg.router_input == "prompt"            # update sees (B, T, I)
        self.scaling = cfg.alpha / r                                   # c_d, domain experts
        self.scaling_universal = cfg.alpha / r_u                       # c_*
        self.act = partial(F.leaky_relu, negative_slope=cfg.negative_slope)
        self.universal_A = nn.Parameter(torch.empty(r_u, I))
        self.universal_B = nn.Parameter(torch.empty(O, r_u))
        self.lora_A = nn.Parameter(torch.empty(E, r, O if cfg.variant == "res" else I))  # Res: reads h
        self.lora_B = nn.Parameter(torch.empty(E, O, r))
        self.router = Router(I, E + (cfg.variant == "flan"))          # soft; Flan: row 0 weights *
        self.active = None          # None: routed (stage 3, inference); UNIVERSAL: stage 1; i: stage 2
        self.reset_parameters()

    def reset_parameters(self):
        lora_uniform_(self.universal_A)
        nn.init.zeros_(self.universal_B)                  # B = 0 -> update = 0 -> output == base(x)
        lora_uniform_(self.lora_A)                        # fan_in = I (Flan) or O (Res)
        nn.init.zeros_(self.lora_B)
        self.router.reset_parameters()

    def universal(self, x):
        """c_* B_* A_* x: x (N, I) -> (N, O). The h of Res."""
        return self.scaling_universal * (x @ self.universal_A.T) @ self.universal_B.T

    def route(self, x, T):
        """x (N, I) -> s (N, n+1) Flan, (N, n) Res. Prompt routing (T, the sequence length, given):
        each sequence's first prompt_len tokens, pooled, give that sequence's gates, repeated over
        its T tokens."""
        if T is None:
            return self.router(x)                                     # (N, E)  Eq. 5-8, per token
        pooled = x.view(-1, T, x.shape[-1])[:, :self.prompt_len].mean(1)   # (B, I)
        s = self.router(pooled).repeat_interleave(T, 0)               # (B, E) -> (N, E)
        self.router.gates = s.detach()                                # per token, for expert usage
        return s

    def update(self, x, dispatch):
        """x (N, I), or (B, T, I) with prompt routing -> (N, O), the forward of the current stage
        (§3: Eq. 4 in stage 2, Eq. 5-8 / 9-12 when routed)."""
        T = x.shape[1] if self.sequence_input else None
        x = x.reshape(-1, x.shape[-1])                                # (N, I)
        if self.active == UNIVERSAL:                      # stage 1: W0 x + c_* B_* A_* x
            return self.universal(x)
        if self.active is None:                           # stage 3 and inference: routed
            s = self.route(x, T)                                      # (N, n+1) Flan, (N, n) Res
            A, B = self.lora_A, self.lora_B
        else:                                             # stage 2: domain expert i alone, s_i = 1
            i = self.active
            s, A, B = x.new_ones(x.shape[0], 1), self.lora_A[i:i + 1], self.lora_B[i:i + 1]
        if self.variant == "res":
            h = self.universal(x)                                         # (N, O)  Eq. 9-12: h
            return h + dispatch(h, A, B, s, self.scaling, self.act)       # h + sum_i s_i c B_i act(A_i h)
        if self.active is not None:                       # Flan stage 2 (Eq. 4): no universal expert
            return dispatch(x, A, B, s, self.scaling)
        return s[:, :1] * self.universal(x) + dispatch(x, A, B, s[:, 1:], self.scaling)   # Eq. 5-8


def modula_num_params(I: int, O: int, cfg: MoDULAConfig, part: str = "total") -> int:
    """Trainable parameters per adapted linear (§3). part: "universal" (stage 1),
    "domain" (stage 2, one domain), "router" (stage 3) or "total"."""
    n, r, r_u = cfg.num_domains, cfg.domain_rank, cfg.universal_rank
    res = cfg.variant == "res"
    counts = {"universal": r_u * (I + O),
              "domain": r * (O + O) if res else r * (I + O),      # Res: A_i reads h (O)
              "router": n * I if res else (n + 1) * I}
    counts["total"] = counts["universal"] + n * counts["domain"] + counts["router"]
    return counts[part]


def modula_stages(cfg: MoDULAConfig, domains: tuple, general: str, new: str | None = None) -> list:
    """The schedule of §3 / Fig. 2 for train.py. `domains` are task names, expert i <-> domain i.
    With `new` (a domain just appended by common.append_expert): stage 2 for it alone, then stage 3.

    Stage 2 hands the stacked lora_A / lora_B to the optimiser, but only expert i is in its
    forward: the others get exactly zero gradient, so AdamW without weight decay (train.py) leaves
    them bit-identical; tests/test_modula.py checks it."""
    universal_frac, domain_frac, router_frac = cfg.stage_steps
    plan = [] if new else [                              # universal data: general + every domain
        Stage("universal", (general, *domains), setup=stage_mode(UNIVERSAL), steps_frac=universal_frac,
              params=lambda layers: [p for m in layers for p in (m.universal_A, m.universal_B)])]
    plan += [Stage(f"domain {t}", (t,), setup=stage_mode(i), steps_frac=domain_frac / len(domains),
                   params=lambda layers: [p for m in layers for p in (m.lora_A, m.lora_B)])
             for i, t in enumerate(domains) if new in (None, t)]
    plan.append(Stage("router", (general, *domains), setup=stage_mode(None), steps_frac=router_frac,
                      params=lambda layers: [m.router.weight for m in layers],
                      lr_scale=cfg.router_lr_scale))
    return plan
