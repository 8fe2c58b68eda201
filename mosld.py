"""MoSLD: a mixture of LoRA experts that share one down-projection A, with DropConnect on A.

MoSLD: An Extremely Parameter-Efficient Mixture-of-Shared LoRAs for Multi-Task Learning
(Zhao et al., COLING 2025), https://arxiv.org/abs/2412.08946

    g(x) = renorm(TopK_K(softmax(W_l x)))                                    (Eq. 1)
    A~   = (M * A) / (1 - p),  M_ij ~ Bernoulli(1 - p), while training; A~ = A at eval   (Eq. 2)
    y    = W0 x + (alpha / r) * sum_{e in TopK} g_e(x) * B_e (A~ x)           (Eq. 3)

A (r, I) is shared by the E_l experts of one adapted linear, so z = A~ x (N, r) is computed once
per token and only the output side B_e is mixed. A is read as the input side because §3.1
initialises A Gaussian and B zero, as Hu et al.'s LoRA (docs/interpretations.md). One DropConnect mask per
training forward, on the entries of A, seen by every expert and token of that step. The number of
experts E_l depends on the depth: num_experts=(8, 6, 4, 2) splits the layers into four equal
blocks (§4.3); (2, 4, 6, 8) is the reverse that §5.2 / Fig. 7 prefers in the mixture setting.
Defaults: r=8, alpha=16, K=2, p=0.1, q and v adapted (§4.3).

Not included: merging (the routed update depends on x); input dropout (the paper names none).
Deviations: Eq. 4 is garbled in the paper, so we use the Switch balancing loss, coefficient 0.01
(docs/interpretations.md); A is Kaiming-uniform (as loralib, Hu et al.'s code) rather than Gaussian.
A layer with E_l <= K routes softly (every expert kept) and has no balancing loss.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import AdaptedLinear, Router, check_config, check_field, is_int, lora_uniform_


@dataclass
class MoSLDConfig:
    num_experts: int | tuple = (8, 6, 4, 2)  # E_l: one int, or per equal block of layers (§4.3)
    rank: int = 8                  # r, of the shared A and of every B_e
    alpha: float = 16.0            # scaling = alpha / r = 2 (§4.3)
    top_k: int = 2                 # K (Eq. 1); layers with E_l <= K keep all their experts
    drop_a: float = 0.1            # p, DropConnect on the entries of the shared A (Eq. 2, §4.3)
    aux_loss_coef: float = 0.01    # Switch balancing loss; the paper gives no value
    drop_b: float = 0.0            # DropConnect on the entries of B instead: Table 2's ablation
    targets: tuple = ("q", "v")    # attention q and v only (§4.3, Limitations)

    def __post_init__(self):
        check_config(self)             # types; rank >= 1, alpha > 0, drop_a/drop_b in [0, 1), aux >= 0
        counts = self.num_experts if isinstance(self.num_experts, tuple) else (self.num_experts,)
        check_field("MoSLDConfig", "num_experts", self.num_experts,
                    len(counts) > 0 and all(is_int(E) and E >= 1 for E in counts),
                    "an integer >= 1 or a non-empty tuple of them (one per block of layers)")
        check_field("MoSLDConfig", "top_k", self.top_k,
                    1 <= self.top_k <= max(counts) and (self.top_k > 1 or max(counts) == 1),
                    f"in 2..max(num_experts) ({max(counts)}): the kept gates are renormalised, and "
                    "one renormalised gate is always 1, which the router cannot learn from")

    def for_layer(self, index: int, depth: int) -> "MoSLDConfig":
        """The config of block `index` of `depth`: pattern (8, 6, 4, 2) over 32 layers gives 8
        experts to layers 0-7, 6 to 8-15, ... (§4.3); over 4 layers, 8, 6, 4, 2."""
        if isinstance(self.num_experts, int):
            return self
        assert 0 <= index < depth, (index, depth)
        block = index * len(self.num_experts) // depth   # equal blocks of consecutive layers
        return replace(self, num_experts=self.num_experts[block])


class MoSLDLinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: MoSLDConfig):
        super().__init__(base, cfg.aux_loss_coef)
        cfg = cfg.for_layer(0, 1)                         # a per-depth pattern: a lone layer is block 0
        I, O, E, r = base.in_features, base.out_features, cfg.num_experts, cfg.rank
        self.drop_a, self.drop_b = cfg.drop_a, cfg.drop_b
        self.scaling = cfg.alpha / r
        self.shared_A = nn.Parameter(torch.empty(r, I))
        self.lora_B = nn.Parameter(torch.empty(E, O, r))
        self.router = Router(I, E, min(cfg.top_k, E))    # renormalised top-k (Eq. 1); soft if E <= K
        self.reset_parameters()

    def reset_parameters(self):
        lora_uniform_(self.shared_A)                      # random A, shared: A_1 = ... = A_E (§3.1)
        nn.init.zeros_(self.lora_B)                       # B = 0 -> update = 0 -> output == base(x)
        self.router.reset_parameters()

    def update(self, x, dispatch):
        """x (N, I) -> scaling * sum_e g_e B_e (A~ x), (N, O); A~ x is formed once per token."""
        # F.dropout on a weight is DropConnect: M * A / (1 - p), one fresh mask per call; A at eval
        A = F.dropout(self.shared_A, self.drop_a, self.training)  # (r, I)  Eq. 2, one mask per step
        B = F.dropout(self.lora_B, self.drop_b, self.training)    # (E, O, r)  Table 2 ablation
        gates = self.router(x, fold=A, dispatch=dispatch)         # (N, E)  Eq. 1; W_g x beside x A~^T
        return dispatch(x, A, B, gates, self.scaling, idx=self.router.idx,
                        xa=self.router.xa)                        # (N, O)  Eq. 3: x A~^T once per token

    def delta_weight(self, e: int) -> torch.Tensor:
        """Dense (O, I) update of expert e (eval: no mask). For merging and tests, never in forward."""
        return self.scaling * self.lora_B[e] @ self.shared_A      # (O, r) @ (r, I) -> (O, I)


def mosld_num_params(I: int, O: int, cfg: MoSLDConfig) -> int:
    """r I + E r O + E I per adapted linear: shared A, the E experts' B, router (§4.3, Table 5).
    `cfg` is one layer's config (cfg.for_layer(index, depth) when the counts vary with depth)."""
    E, r = cfg.num_experts, cfg.rank
    return r * I + E * r * O + E * I
