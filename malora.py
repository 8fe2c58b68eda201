"""MALoRA: a mixture of asymmetric LoRA experts over one shared input subspace.

MALoRA: Mixture of Asymmetric Low-Rank Adaptation for Enhanced Multi-Task Learning
(Wang et al., Findings NAACL 2025; arXiv v1), https://arxiv.org/abs/2410.22782

Extra legend letter: S, the shared rank (the paper's d).  r here is r-bar, the expanded rank.

    G(x) = renorm(TopK_K(softmax(W_g x)))                                    (Eq. 4)
    z    = S_A x                          S_A (S, I), shared by the E experts  (Eq. 6)
    y    = W0 x + (alpha / r) * sum_{t in TopK} G_t(x) * B_t P_t z            (Eq. 7)
           P_t (r, S) per expert,  B_t (O, r) per expert, zero init;  Delta W_t = B_t P_t S_A

From a MoLoRA of rank r0 with E experts and lambda < 1: S = lambda r0 E, r = (2 - lambda) r0
(§3.2; r0=8, E=8, lambda=0.5 give S=32, r=12, alpha=24 so alpha/r = 2 as the baseline, Table 8).
z = dropout(x) S_A^T is computed once per token; the E small P_t and the B_t are mixed by the
common dispatch, with z in the role of x and P in the role of a per-expert A.

Init (§3.2, Eq. 8-10): K_t ~ Kaiming-uniform (S, I), K_t = U_t Sigma_t V_t (economy SVD),
P_t = (U_t Sigma_t)[:r] / beta,  S_A = beta V_0,  B_t = 0.  beta moves gradient between the
shared and the private factors (Appendix A.3).

Not included: merging (the routed update depends on x); FastMoE grouped dispatch.
Deviations: the paper draws N+1 matrices K_0..K_N; we draw E and take S_A from expert 0's V
(docs/interpretations.md). Renormalised top-k and the Switch loss at 0.01 are our reading
(the paper states neither). Dropout 0.05 on x before S_A, as PEFT's LoRA dropout. MALoRA-Small keeps alpha/r = 2 (alpha is not given).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import AdaptedLinear, Router, check_config, check_field, check_renormalize, lora_uniform_


@dataclass
class MALoRAConfig:
    num_experts: int = 8          # E
    rank: int = 12                # r-bar = (2 - lambda) r0, the expanded rank of P_t and B_t
    shared_rank: int = 32         # S (paper's d) = lambda r0 E, rows of the shared S_A
    alpha: float = 24.0           # scaling = alpha / r-bar = 2, as MoLoRA's 16 / 8 (Table 8)
    top_k: int = 2                # K (Tables 8-9)
    beta: float = 1.0             # init weight balance scale (Table 8; 1.25 intra-domain)
    aux_loss_coef: float = 0.01   # Tables 8-9 (0.001 in the text of §4.1)
    dropout: float = 0.05         # on x, before S_A (Tables 8-9)
    renormalize: bool = True      # not stated in the paper; Mixtral/MixLoRA practice
    targets: tuple = ("q", "k", "v", "up", "down")   # all but o; the tiny GPT has no gate

    def __post_init__(self):
        check_config(self)    # types; E, r, S >= 1, alpha, beta > 0, aux >= 0, dropout in [0, 1)
        check_field("MALoRAConfig", "shared_rank", self.shared_rank, self.shared_rank >= self.rank,
                    f">= rank ({self.rank}), so that each expert can reach rank r-bar (§3.2)")
        check_field("MALoRAConfig", "top_k", self.top_k, 1 <= self.top_k <= self.num_experts,
                    f"in 1..num_experts ({self.num_experts})")
        check_renormalize(self)

    @classmethod
    def from_molora(cls, rank: int = 8, num_experts: int = 8, lam: float = 0.5, **kw):
        """The MALoRA that replaces a MoLoRA of rank r0: S = lambda r0 E, r-bar = (2 - lambda) r0,
        alpha = 2 r-bar (Tables 8-9: alpha / r-bar = 2, the baseline's 16 / 8). from_molora(8, 8,
        0.5) is the default config."""
        check_field("MALoRAConfig", "lam", lam, 0 < lam < 1, "in (0, 1)")
        r = round((2 - lam) * rank)
        return cls(num_experts=num_experts, rank=r, shared_rank=round(lam * rank * num_experts),
                   alpha=2.0 * r, **kw)


MALORA_SMALL = {"rank": 8, "shared_rank": 22, "alpha": 16.0}   # MALoRA-Small (Table 1, §4.1)


class MALoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: MALoRAConfig):
        super().__init__(base, cfg.aux_loss_coef)
        I, O, E, r, S = base.in_features, base.out_features, cfg.num_experts, cfg.rank, cfg.shared_rank
        check_field("MALoRAConfig", "shared_rank", S, S <= I, f"<= in_features ({I}): S_A is (S, I)")
        self.beta = cfg.beta
        self.scaling = cfg.alpha / r
        self.shared_A = nn.Parameter(torch.empty(S, I))
        self.lora_P = nn.Parameter(torch.empty(E, r, S))
        self.lora_B = nn.Parameter(torch.empty(E, O, r))
        self.router = Router(I, E, cfg.top_k, cfg.renormalize)
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        (E, r, S), I = self.lora_P.shape, self.shared_A.shape[1]
        K = lora_uniform_(torch.empty(E, S, I, device=self.shared_A.device))   # (E, S, I)  Eq. 8
        U, sigma, V = torch.linalg.svd(K, full_matrices=False)  # (E, S, S), (E, S), (E, S, I)
        self.lora_P.copy_((U * sigma[:, None, :])[:, :r] / self.beta)   # (E, r, S)  (U Sigma)[:r]/beta
        self.shared_A.copy_(self.beta * V[0])             # (S, I)  beta V_0: orthonormal rows x beta
        nn.init.zeros_(self.lora_B)                       # B = 0 -> update = 0 -> output == base(x)
        self.router.reset_parameters()

    def update(self, x, dispatch):
        """x (N, I) -> scaling * sum_t G_t B_t P_t S_A x, (N, O); S_A x is formed once per token."""
        gates = self.router(x)                            # (N, E)  the router reads x, not z
        z = self.dropout(x) @ self.shared_A.T             # (N, S)  Eq. 6: z = S_A x, once per token
        return dispatch(z, self.lora_P, self.lora_B, gates, self.scaling,
                        idx=self.router.idx)              # (N, O)  Eq. 7; idx: for the grouped path

    def delta_weight(self, e: int) -> torch.Tensor:
        """Dense (O, I) update of expert e, B_e P_e S_A. For merging and tests, never in forward."""
        return self.scaling * self.lora_B[e] @ self.lora_P[e] @ self.shared_A   # (O, r) (r, S) (S, I)


def malora_num_params(I: int, O: int, cfg: MALoRAConfig) -> int:
    """S I + E r S + E r O + E I per adapted linear: S_A, P_t, B_t, router (§4.1, Table 3)."""
    E, r, S = cfg.num_experts, cfg.rank, cfg.shared_rank
    return S * I + E * r * S + E * r * O + E * I
