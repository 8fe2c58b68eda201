"""MoLoRA: a mixture of LoRA experts, routed per token.

Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction
Tuning (Zadouri et al., ICLR 2024), https://arxiv.org/abs/2309.05444 ; code: github.com/for-ai/parameter-efficient-moe

    g(x) = softmax(W_g x)                         soft routing, the original (the code's MoLoRa)
    g(x) = renorm(TopK_K(softmax(W_g x)))         top-k, as MALoRA Eq. 3-5 restates it
    y    = W0 x + (alpha / r) * sum_e g_e(x) * B_e A_e x

Init and routing follow the official code (src/molora.py, configs/molora.gin): A ~ N(0, 0.02^2), B = 0, router
~ N(0, 0.02^2), no bias, float32 router logits, no aux loss with soft routing. top_k=K turns on
the top-k variant with the Switch balancing loss (coefficient 0.01, MALoRA Tables 8-9); top-1
needs renormalize=False (one renormalised gate is always 1 and would not train the router).
Not included: MoV ((IA)^3 experts), router jitter noise, routing on sentence embeddings.
Deviations: alpha is a config field (the official code fixes it at 16). E = 8, r = 8 are the
MALoRA baseline's sizes (MALoRA §4.1), not the official config's E = 10, r = 4. No dropout by default,
as in the official code; the MALoRA paper lists LoRA dropout 0.05 for its whole setup, baseline
included (MALoRA Tables 8-9), so `--cfg dropout=0.05` matches that comparison.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import AdaptedLinear, Router, check_config, check_field, check_renormalize


@dataclass
class MoLoRAConfig:
    num_experts: int = 8          # E
    rank: int = 8                 # r, per expert
    alpha: float = 16.0           # scaling = alpha / r (the official code fixes alpha = 16)
    top_k: int | None = None      # K; None = soft routing over all E experts (the original)
    renormalize: bool = True      # top-k weights renormalised to sum to 1 (Mixtral/MixLoRA practice)
    aux_loss_coef: float = 0.01   # Switch balancing loss, used only when top_k < E
    dropout: float = 0.0          # on x; none in the official code
    targets: tuple = ("q", "k", "v", "o", "up", "down")   # attention and FFN, as the official code

    def __post_init__(self):
        check_config(self)            # types; E, r >= 1, alpha > 0, aux_loss_coef >= 0, dropout in [0, 1)
        check_field("MoLoRAConfig", "top_k", self.top_k,
                    self.top_k is None or 1 <= self.top_k <= self.num_experts,
                    f"None (soft) or in 1..num_experts ({self.num_experts})")
        check_renormalize(self)


class MoLoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: MoLoRAConfig):
        super().__init__(base, cfg.aux_loss_coef)
        I, O, E, r = base.in_features, base.out_features, cfg.num_experts, cfg.rank
        self.scaling = cfg.alpha / r
        self.lora_A = nn.Parameter(torch.empty(E, r, I))
        self.lora_B = nn.Parameter(torch.empty(E, O, r))
        self.router = Router(I, E, cfg.top_k, cfg.renormalize)   # soft when top_k is None
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.lora_A, std=0.02)            # official code: A ~ N(0, 0.02^2)
        nn.init.zeros_(self.lora_B)                       # B = 0 -> update = 0 -> output == base(x)
        self.router.reset_parameters()

    def update(self, x, dispatch):
        """x (N, I) -> scaling * sum_e g_e B_e A_e x, (N, O). The router reads x, the experts
        dropout(x); without dropout both read x, so W_g x rides in the x A^T matmul (fold)."""
        fold = None if self.dropout.p else self.lora_A          # both read x: one matmul
        gates = self.router(x, fold, dispatch)                    # (N, E)
        return dispatch(self.dropout(x), self.lora_A, self.lora_B, gates, self.scaling,
                        idx=self.router.idx, xa=self.router.xa)   # (N, O)

    def delta_weight(self, e: int) -> torch.Tensor:
        """Dense (O, I) update of expert e. For merging and tests, never called by forward."""
        return self.scaling * self.lora_B[e] @ self.lora_A[e]     # (O, r) @ (r, I) -> (O, I)


def molora_num_params(I: int, O: int, cfg: MoLoRAConfig) -> int:
    """E r (I + O) + E I per adapted linear: experts + bias-free router."""
    E, r = cfg.num_experts, cfg.rank
    return E * r * (I + O) + E * I
