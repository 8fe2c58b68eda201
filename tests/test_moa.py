"""Tests for moa.py: gathered / fused vs naive, gold routing equals the domain's single LoRA, merge,
zero update at init, parameter formulas, config errors, stages, adding a domain, train.py."""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from common import append_expert, count_trainable  # noqa: E402
from layer_checks import assert_paths_match  # noqa: E402
from lora import LoRAConfig, LoRALinear  # noqa: E402
from moa import (MoAConfig, MoALinear, merge, moa_metrics, moa_num_params,  # noqa: E402
                 moa_stages)
from test_modula import (L, adapted_sizes, changed, expect_only,  # noqa: E402
                         run_stage, run_train, snapshot, tiny_model)

B_, T_, I_, O_, E_ = 3, 7, 37, 53, 5                  # odd shapes: batch, time, in, out, domains


def odd_layer(routing="sequence", seed=0):
    torch.manual_seed(seed)
    layer = MoALinear(nn.Linear(I_, O_), MoAConfig(num_domains=E_, routing=routing, prompt_len=4))
    nn.init.normal_(layer.lora_B)                    # B = 0 would make these tests trivial
    nn.init.normal_(layer.router.weight)
    return layer.double()


@pytest.mark.parametrize("mode", ["argmax", "gold", "token", "active"])
def test_fused_matches_naive(mode):
    layer = odd_layer("token" if mode == "token" else "sequence")
    if mode == "gold":
        layer.train()
        layer.gold = torch.tensor([4, 0, 2])
    else:
        layer.eval()
    layer.active = 1 if mode == "active" else None
    x, dy = torch.randn(B_, T_, I_).double(), torch.randn(B_, T_, O_).double()
    assert_paths_match(layer, x, dy)


def test_gold_routing_equals_each_domains_single_lora():
    """A batch mixing domains: every sequence gets exactly its domain's LoRA (lora.LoRALinear)."""
    layer = odd_layer().train()
    layer.gold = torch.tensor([3, 0, 3])
    x = torch.randn(B_, T_, I_).double()
    y = layer(x)
    for b, j in enumerate(layer.gold.tolist()):
        single = LoRALinear(layer.base, LoRAConfig(rank=8, alpha=16.0)).double()
        with torch.no_grad():
            single.lora_A.copy_(layer.lora_A[j])
            single.lora_B.copy_(layer.lora_B[j])
        torch.testing.assert_close(y[b], single(x[b]))


def test_inference_routes_by_argmax_of_the_pooled_prompt():
    layer = odd_layer().eval()
    layer.gold = torch.tensor([0, 0, 0])             # ignored outside training
    x = torch.randn(B_, T_, I_).double()
    y = layer(x)
    pick = (x[:, :4].mean(1) @ layer.router.weight.T).argmax(-1)      # P = 4 prompt positions
    layer.train()
    layer.gold = pick
    torch.testing.assert_close(y, layer(x))
    x2 = x.clone()
    x2[:, 4:] = torch.randn(B_, T_ - 4, I_).double()  # positions after the prompt do not route
    layer.eval()
    layer(x2)
    assert torch.equal(layer.logits.argmax(-1), pick)


def test_merge_equals_unmerged():
    cfg = MoAConfig(num_domains=3, prompt_len=L + 2)
    model, layers = tiny_model(MoALinear, cfg)
    for m in layers:
        nn.init.normal_(m.lora_B, std=0.1)
        m.active = 2                                 # domain 2 for every sequence
    x = torch.randint(0, 10, (4, 2 * L + 2))
    want = model(x)
    merge(model, 2)
    assert not any(isinstance(m, MoALinear) for m in model.modules())
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_update_is_zero_after_reset(routing):
    layer = odd_layer(routing).float()
    layer.reset_parameters()
    x = torch.randn(B_, T_, I_)
    for active in (None, 2):
        layer.active = active
        assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("I,O,E", [(37, 53, 5), (16, 64, 1)])
def test_param_formulas(I, O, E):
    cfg = MoAConfig(num_domains=E)
    layer = MoALinear(nn.Linear(I, O), cfg)
    real = {"lora": layer.lora_A[0].numel() + layer.lora_B[0].numel(),
            "router": layer.router.weight.numel(), "total": count_trainable(layer)}
    assert real == {part: moa_num_params(I, O, cfg, part) for part in real}


@pytest.mark.parametrize("field,value", [("routing", "task"), ("rank", 0), ("num_domains", 0),
                                         ("prompt_len", 0), ("router_loss_coef", 0.0),
                                         ("stage_steps", (1.0,))])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MoAConfig.{field}="):
        MoAConfig(**{field: value})


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_each_stage_changes_only_its_parameters(routing):
    domains = ("add1", "neg", "mul3")
    cfg = MoAConfig(num_domains=3, routing=routing, prompt_len=L + 2, targets=("q", "up", "down"))
    model, layers = tiny_model(MoALinear, cfg)
    plan = moa_stages(cfg, domains, tasks.GENERAL)
    assert [s.name for s in plan] == ["lora add1", "lora neg", "lora mul3", "router"]
    for j, stage in enumerate(plan):
        before = snapshot(layers)
        run_stage(model, layers, stage, domains)
        allowed = {"router.weight": slice(None)} if stage.name == "router" else {"lora_A": j, "lora_B": j}
        expect_only(changed(before, layers), allowed)


def test_router_learns_the_domain_and_adding_one_keeps_old_loras():
    domains, new = ("add1", "neg"), "subst"
    cfg = MoAConfig(num_domains=2, prompt_len=L + 2, targets=("q", "up", "down"))
    model, layers = tiny_model(MoALinear, cfg)
    for stage in moa_stages(cfg, domains, tasks.GENERAL):
        run_stage(model, layers, stage, domains, steps=100 if stage.name == "router" else 2)
    ids = tasks.task_ids_for(domains, 64, torch.Generator().manual_seed(1))
    x, _ = tasks.lm_inputs(*tasks.make_batch(ids, L, "eval", torch.Generator().manual_seed(1)))
    dom = torch.tensor([domains.index(tasks.ALL_TASKS[i]) for i in ids])
    assert moa_metrics(model, layers, x, dom)["router_accuracy"] >= 0.95   # the task token decides
    before = snapshot(layers)
    for m in layers:
        append_expert(m)
    grown_cfg = MoAConfig(num_domains=3, prompt_len=L + 2, targets=cfg.targets)
    grown = snapshot(layers)
    for stage in moa_stages(grown_cfg, (*domains, new), tasks.GENERAL, new=new):
        run_stage(model, layers, stage, (*domains, new), steps=2)
    for m, old in zip(layers, before):
        assert torch.equal(m.lora_A[:2], old["lora_A"]) and torch.equal(m.lora_B[:2], old["lora_B"])
    diff = changed(grown, layers)
    expect_only(diff, {"lora_A": 2, "lora_B": 2, "router.weight": slice(None)})
    assert sum(int(d.sum()) for layer_diff in diff for d in layer_diff.values()) == sum(
        moa_num_params(I, O, grown_cfg, "lora") + moa_num_params(I, O, grown_cfg, "router")
        for I, O in adapted_sizes(layers))


def test_train_py_stages_router_accuracy_and_add_domain(tmp_path):
    m = run_train(tmp_path, "--method", "moa", "--exclude-task", "neg", out="four")
    assert [s["stage"] for s in m["stages"]] == ["lora add1", "lora subst", "lora mul3",
                                                 "lora addpos", "router"]
    assert 0 <= m["router_accuracy"] <= 1 and len(m["router_accuracy_per_layer"]) == 6
    m2 = run_train(tmp_path, "--method", "moa", "--add-domain", "neg", "--init-adapter",
                   str(tmp_path / "four" / "adapter.safetensors"), out="five")
    add = m2["add_domain"]
    assert [s["stage"] for s in m2["stages"]] == ["lora neg", "router"]
    assert m2["tasks"] == ["add1", "subst", "mul3", "addpos", "neg"]
    assert add["params_touched"] == sum(s["params_changed"] for s in m2["stages"])
    assert add["touched_share"] < 0.25


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_forward_takes_any_leading_shape(routing):
    """forward(x) takes (..., I) (every adapted layer's contract): the last two dims are (T, I), the ones before are batch;
    a 2-D x is one sequence, a 1-D x one token. Same numbers as the (B, T, I) call, and as the loop."""
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(12, 10), MoAConfig(num_domains=3, rank=2, routing=routing, prompt_len=2)).double()
    nn.init.normal_(layer.lora_B)
    for shape in [(12,), (5, 12), (2, 5, 12), (2, 3, 5, 12)]:
        x = torch.randn(*shape, dtype=torch.float64)
        y = layer(x)
        assert y.shape == (*shape[:-1], 10)
        torch.testing.assert_close(y, layer.forward_naive(x))
        batch = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.view(1, 1, -1)   # (B, T, I)
        torch.testing.assert_close(y.reshape(-1, *y.shape[-2:]) if y.dim() >= 2 else y.view(1, 1, -1),
                                   layer(batch))
