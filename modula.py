"""MoDULA: one universal LoRA expert and n domain experts, trained in three stages.

MoDULA: Mixture of Domain-Specific and Universal LoRA for Multi-Task Learning (Ma et al.,
EMNLP 2024), https://aclanthology.org/2024.emnlp-main.161 ; METHODS.md §4.

Flan (parallel, Fig. 1b): one router weights the universal expert * and the domain experts

    s = softmax(W_R x),  W_R (n+1, I)                                               (Eq. 5-8)
    y = W0 x + s_* c_* B_* A_* x + sum_i s_i c_i B_i A_i x

Res (serial plus residual, Fig. 1c): the domain experts read the universal update h

    h = c_* B_* A_* x                              always on, unweighted             (Eq. 9-12)
    s = softmax(W_R x),  W_R (n, I)                input x, not h
    y = W0 x + h + sum_i s_i c_i B_i LeakyReLU(A_i h),  A_i (r_d, O)

c_j = alpha / r_j, r_* = 16, r_d = 8. The three stages (METHODS.md 4(c)), each with its forward:
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
uses the general task plus every domain, uniformly (METHODS.md 4(b)). The universal data
(airoboros-3.2, broad instructions, in the paper) is here that same mixture: on the general task
alone, which the base model already solves, B_* stays at its zero init, so h = 0 and Res's domain
experts, which read h, get no gradient at all (measured: 0 % on every task). The paper trains one epoch
per stage; here stage 3 gets as many steps as all of stage 2 (stage_steps). A router over frozen
experts is slow to learn on the synthetic tasks: in compare.py (rank 2, 300 steps) Flan routes to
23 % by default and to 79 % (its experts alone: 80 %) with stage_steps=(0.25, 1.0, 4.0).
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
    targets: tuple = ("q", "k", "v", "o", "up", "down")   # not reported; same as MoLoRA here

    def __post_init__(self):
        check_config(self)            # types; n, ranks >= 1, alpha > 0, negative_slope >= 0
        c = "MoDULAConfig"
        check_field(c, "variant", self.variant, self.variant in ("flan", "res"), "'flan' or 'res'")
        check_field(c, "stage_steps", self.stage_steps,
                    len(self.stage_steps) == 3 and all(is_real(f) and f > 0 for f in self.stage_steps),
                    "3 shares > 0 (universal, domains, router)")


class MoDULALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: MoDULAConfig):
        super().__init__(base)
        I, O, E, r, r_u = (base.in_features, base.out_features, cfg.num_domains, cfg.domain_rank,
                           cfg.universal_rank)
        self.variant = cfg.variant
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

    def update(self, x, dispatch):
        """x (N, I) -> (N, O), the forward of the current stage (METHODS.md 4(a), 4(c))."""
        if self.active == UNIVERSAL:                      # stage 1: W0 x + c_* B_* A_* x
            return self.universal(x)
        if self.active is None:                           # stage 3 and inference: routed
            s = self.router(x)                                        # (N, n+1) Flan, (N, n) Res
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
    """Trainable parameters per adapted linear, METHODS.md 4(d). part: "universal" (stage 1),
    "domain" (stage 2, one domain), "router" (stage 3) or "total"."""
    n, r, r_u = cfg.num_domains, cfg.domain_rank, cfg.universal_rank
    res = cfg.variant == "res"
    counts = {"universal": r_u * (I + O),
              "domain": r * (O + O) if res else r * (I + O),      # Res: A_i reads h (O)
              "router": n * I if res else (n + 1) * I}
    counts["total"] = counts["universal"] + n * counts["domain"] + counts["router"]
    return counts[part]


def modula_stages(cfg: MoDULAConfig, domains: tuple, general: str, new: str | None = None) -> list:
    """The schedule of METHODS.md 4(c) for train.py. `domains` are task names, expert i <-> domain i.
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
                      params=lambda layers: [m.router.weight for m in layers]))
    return plan
