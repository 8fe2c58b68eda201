"""MoSLD: fused vs naive (outputs and every gradient), DropConnect on the shared A, per-layer
expert counts, the zero update at init, config errors, and a tiny train.py run."""
import re

import pytest
import torch
import torch.nn as nn

from common import dispatch_fused, route
from layer_checks import (assert_compiles_whole, assert_delta_weights_match_forward, assert_paths_match,
                          assert_zero_update)
from mosld import MoSLDConfig, MoSLDLinear, mosld_num_params
from trainproc import train_in



def make(I=37, O=53, E=5, K=2, r=4, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoSLDLinear(nn.Linear(I, O), MoSLDConfig(num_experts=E, top_k=K, rank=r, **kw)).double()
    nn.init.normal_(layer.lora_B)                     # B = 0 would make the comparisons trivial
    return layer


@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("training", [False, True])
def test_fused_matches_naive(K, training):
    layer = make(K=K, drop_a=0.3, drop_b=0.2).train(training)   # both masks, reseeded
    assert tuple(n for n, p in layer.named_parameters() if p.requires_grad) == ("shared_A", "lora_B", "router.weight")
    x, dy = torch.randn(7, 37).double(), torch.randn(7, 53).double()
    assert_paths_match(layer, x, dy, seed=1, names=("y", "x", "shared_A", "lora_B", "router"))


def test_layer_compiles_without_graph_break():
    assert_compiles_whole(make().train(), torch.randn(6, 37).double())


def test_update_is_zero_after_reset():
    assert_zero_update(make(), torch.randn(2, 5, 37).double())


def capture(layer, x):
    """Run the layer's update with a dispatch that records what the layer hands it."""
    seen = {}

    def record(x2, A, B, gates, scaling, **kw):
        seen.update(A=A, B=B, gates=gates)
        return dispatch_fused(x2, A, B, gates, scaling, **kw)
    return layer.update(x, record), seen


def test_dropconnect_statistics():
    p = 0.1
    layer = make(I=400, O=8, r=64, E=3, drop_a=p).train()
    x = torch.randn(6, 400).double()
    y, seen = capture(layer, x)
    A, A_drop = layer.shared_A, seen["A"]
    kept = A_drop != 0
    assert A_drop.shape == A.shape                    # one (r, I) matrix, so one mask for all experts
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01          # 25,600 entries: sd 0.002
    torch.testing.assert_close(A_drop[kept], A[kept] / (1 - p))      # Eq. 2: rescaled by 1 / (1 - p)
    _, again = capture(layer, x)
    assert not torch.equal(again["A"] != 0, kept)    # a fresh mask every training forward
    # every expert saw the same masked A: y == scaling * sum_e g_e B_e (A~ x)
    gates = route(x, layer.router, layer.router.top_k)[2]
    z = x @ A_drop.T                                                  # (N, r)
    expect = sum(gates[:, e:e + 1] * (z @ layer.lora_B[e].T) for e in range(3)) * layer.scaling
    torch.testing.assert_close(y, expect)
    # a dropped entry of A gets no gradient in that step ("discard the update", §3.2)
    y.sum().backward()
    assert (layer.shared_A.grad[~kept] == 0).all() and (layer.shared_A.grad[kept] != 0).any()


def test_eval_has_no_mask_and_is_deterministic():
    layer = make(drop_a=0.5).eval()
    x = torch.randn(4, 37).double()
    _, seen = capture(layer, x)
    assert seen["A"] is layer.shared_A and seen["B"] is layer.lora_B
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_drop_b_ablation_masks_b_not_a():
    layer = make(I=8, O=300, r=16, E=4, drop_a=0.0, drop_b=0.5).train()
    _, seen = capture(layer, torch.randn(3, 8).double())
    assert seen["A"] is layer.shared_A
    assert abs((seen["B"] != 0).double().mean().item() - 0.5) < 0.02   # 19,200 entries


def test_delta_weight_matches_forward():
    assert_delta_weights_match_forward(make(K=5).eval(), torch.randn(4, 37).double())   # K = E: soft


def test_balance_loss_only_with_real_top_k():
    x = torch.randn(9, 37).double()
    with_topk, soft = make(E=5, K=2), make(E=2, K=2)
    with_topk(x), soft(x)
    assert with_topk.aux is not None and 1 <= with_topk.aux.item() <= 5
    assert soft.aux is None                           # E_l <= K: every expert kept, nothing to balance


@pytest.mark.parametrize("pattern,depth,expect", [
    ((8, 6, 4, 2), 32, [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8),       # §4.3 on LLaMA-2-7B
    ((8, 6, 4, 2), 4, [8, 6, 4, 2]),
    ((8, 6, 4, 2), 6, [8, 8, 6, 4, 4, 2]),
    ((8, 6, 4, 2), 1, [8]),
    ((2, 4, 6, 8), 4, [2, 4, 6, 8]),                                   # the reverse, §5.2
    (5, 3, [5, 5, 5]),
])
def test_experts_per_layer(pattern, depth, expect):
    cfg = MoSLDConfig(num_experts=pattern)
    assert [cfg.for_layer(i, depth).num_experts for i in range(depth)] == expect


def test_a_lone_layer_from_a_pattern_is_its_first_block():
    """Layer(base, cfg) builds from the default (8, 6, 4, 2) pattern: a model's layer 0 gets 8."""
    layer = MoSLDLinear(nn.Linear(8, 8), MoSLDConfig())
    assert layer.lora_B.shape[0] == 8 and layer.router.weight.shape == (8, 8)


@pytest.mark.parametrize("bad", [dict(num_experts=0), dict(num_experts=()), dict(num_experts=(8, 0)),
                                 dict(rank=0), dict(top_k=0), dict(top_k=9), dict(drop_a=1.0),
                                 dict(drop_b=-0.1), dict(aux_loss_coef=-1.0)])
def test_config_errors_name_the_field(bad):
    (field, value), = bad.items()
    with pytest.raises(ValueError, match=re.escape(f"MoSLDConfig.{field}={value!r}:")):
        MoSLDConfig(**bad)


def test_train_smoke(tmp_path):
    """Two blocks get (8, 6, 4, 2) scaled to depth 2: 8 experts, then 4; the count must match."""
    m = train_in(tmp_path, "--method", "mosld", "--steps", "5", "--pretrain-steps", "5",
                 "--n-layer", "2", "--n-embd", "32", "--batch-size", "8", "--eval-examples", "10",
                 "--digits", "3")
    cfg = MoSLDConfig()
    assert m["trainable_params"] == 2 * sum(mosld_num_params(32, 32, cfg.for_layer(i, 2)) for i in range(2))
