"""LoRA: the single-adapter baseline every mixture is compared against.

LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022),
https://arxiv.org/abs/2106.09685

    y = W0 x + (alpha / r) * B A x,    A (r, I) random,  B (O, r) zero          (Eq. 3)

Names follow loralib and PEFT: lora_A, lora_B, scaling. Not included: merging state machine,
several adapters per layer, DoRA/rsLoRA variants.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import AdaptedLinear, check_config, lora_uniform_


@dataclass
class LoRAConfig:
    rank: int = 8             # r
    alpha: float = 16.0       # scaling = alpha / r
    dropout: float = 0.0      # on x, before A (PEFT's lora_dropout)
    targets: tuple = ("q", "k", "v", "o", "up", "down")   # same modules as MoLoRA by default

    def __post_init__(self):
        check_config(self)                    # types; rank >= 1, alpha > 0, dropout in [0, 1)


class LoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__(base)
        I, O, r = base.in_features, base.out_features, cfg.rank
        self.scaling = cfg.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, I))
        self.lora_B = nn.Parameter(torch.empty(O, r))
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        lora_uniform_(self.lora_A)            # kaiming_uniform(a=sqrt(5)), as loralib and PEFT
        nn.init.zeros_(self.lora_B)           # B = 0 -> update = 0 -> output == base(x)

    def update(self, x, dispatch):
        """One adapter, no experts: both dispatch paths reduce to the same two matmuls."""
        return self.scaling * (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T   # (N, r) -> (N, O)

    def delta_weight(self) -> torch.Tensor:
        """Dense (O, I) update, for merging and tests; never called by forward."""
        return self.scaling * self.lora_B @ self.lora_A                              # (O, I)


def lora_num_params(I: int, O: int, cfg: LoRAConfig) -> int:
    """r (I + O) per adapted linear (Hu et al. §4.1)."""
    return cfg.rank * (I + O)
