"""MALoRA: fused vs naive (outputs and every gradient), the SVD init with beta, the zero update at
init, the lambda relation, config errors, and a tiny train.py run."""
import re

import pytest
import torch
import torch.nn as nn

from common import lora_uniform_
from layer_checks import (assert_compiles_whole, assert_delta_weights_match_forward, assert_paths_match,
                          assert_zero_update)
from malora import MALORA_SMALL, MALoRAConfig, MALoRALinear, malora_num_params
from trainproc import train_in



def make(I=37, O=53, E=5, K=2, r=4, S=9, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MALoRAConfig(num_experts=E, top_k=K, rank=r, shared_rank=S, **kw)
    layer = MALoRALinear(nn.Linear(I, O), cfg).double()
    nn.init.normal_(layer.lora_B)                     # B = 0 would make the comparisons trivial
    return layer


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("training", [False, True])
def test_fused_matches_naive(K, training):
    layer = make(K=K, dropout=0.2, renormalize=K != 1).train(training)   # top-1: Switch's gate
    assert tuple(n for n, p in layer.named_parameters() if p.requires_grad) == ("shared_A", "lora_P", "lora_B", "router.weight")
    x, dy = torch.randn(7, 37).double(), torch.randn(7, 53).double()
    assert_paths_match(layer, x, dy, seed=1, names=("y", "x", "shared_A", "lora_P", "lora_B", "router"))


def test_layer_compiles_without_graph_break():
    assert_compiles_whole(make().train(), torch.randn(6, 37).double())


def test_update_is_zero_after_reset():
    assert_zero_update(make(), torch.randn(2, 5, 37).double())


def test_delta_weight_matches_forward():
    assert_delta_weights_match_forward(make(K=5).eval(), torch.randn(4, 37).double())   # K = E: soft


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_svd_init(beta):
    """S_A = beta V_0 with orthonormal rows; P_t = (U_t Sigma_t)[:r] / beta (Eq. 8-10)."""
    E, r, S, I = 4, 5, 9, 37
    layer = MALoRALinear(nn.Linear(I, 11), MALoRAConfig(num_experts=E, rank=r, shared_rank=S, beta=beta))
    torch.manual_seed(7)
    layer.reset_parameters()
    torch.manual_seed(7)
    K = lora_uniform_(torch.empty(E, S, I))           # the same Kaiming draws, (E, S, I)
    U, sigma, V = torch.linalg.svd(K, full_matrices=False)
    SA, P = layer.shared_A.detach(), layer.lora_P.detach()
    torch.testing.assert_close(SA @ SA.T, beta ** 2 * torch.eye(S))   # rows: orthogonal, norm beta
    torch.testing.assert_close(SA, beta * V[0])
    torch.testing.assert_close(P, (U * sigma[:, None, :])[:, :r] / beta)
    # beta cancels in expert 0's down-projection: P_0 S_A = (U_0 Sigma_0 V_0)[:r] = K_0[:r]
    torch.testing.assert_close(P[0] @ SA, K[0, :r], atol=1e-5, rtol=1e-5)
    assert (layer.lora_B == 0).all()


def test_init_lets_every_expert_reach_rank_r():
    layer = make(r=4, S=9)
    with torch.no_grad():
        ranks = [torch.linalg.matrix_rank(layer.lora_P[t] @ layer.shared_A).item() for t in range(5)]
    assert ranks == [4] * 5


def test_from_molora_gives_the_defaults():
    assert MALoRAConfig.from_molora(rank=8, num_experts=8, lam=0.5) == MALoRAConfig()
    cfg = MALoRAConfig()
    assert (cfg.shared_rank, cfg.rank, cfg.alpha / cfg.rank) == (32, 12, 2.0)   # §4.1, Table 8
    small = MALoRAConfig(**MALORA_SMALL)
    assert (small.rank, small.shared_rank, small.alpha / small.rank) == (8, 22, 2.0)


def test_balance_loss_with_top_k():
    layer = make(E=5, K=2)
    layer(torch.randn(9, 37).double())
    assert layer.aux is not None and 1 <= layer.aux.item() <= 5


@pytest.mark.parametrize("bad", [dict(shared_rank=8), dict(rank=0), dict(num_experts=0), dict(top_k=9),
                                 dict(beta=0.0), dict(dropout=1.0), dict(aux_loss_coef=-0.1)])
def test_config_errors_name_the_field(bad):
    (field, value), = bad.items()
    with pytest.raises(ValueError, match=re.escape(f"MALoRAConfig.{field}={value!r}:")):
        MALoRAConfig(**bad)


def test_shared_rank_must_fit_the_layer():
    with pytest.raises(ValueError, match=r"MALoRAConfig\.shared_rank=32.*in_features \(16\)"):
        MALoRALinear(nn.Linear(16, 16), MALoRAConfig())


def test_train_smoke(tmp_path):
    m = train_in(tmp_path, "--method", "malora", "--variant", "small", "--steps", "5",
                 "--pretrain-steps", "5", "--n-layer", "1", "--n-embd", "32", "--batch-size", "8",
                 "--eval-examples", "10", "--digits", "3")
    cfg = MALoRAConfig(**MALORA_SMALL)                 # q, k, v (32 -> 32), up (32 -> 128), down (128 -> 32)
    expect = 3 * malora_num_params(32, 32, cfg) + malora_num_params(32, 128, cfg) \
        + malora_num_params(128, 32, cfg)
    assert m["trainable_params"] == expect
