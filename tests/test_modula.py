"""Tests for modula.py: fused vs naive, zero update at init, parameter formulas (MoDULA §3),
config errors, what each stage changes, adding a domain, and the stages run from train.py."""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from common import append_expert, count_trainable, inject  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from layer_checks import assert_paths_match  # noqa: E402
from modula import (UNIVERSAL, MoDULAConfig, MoDULALinear, modula_num_params,  # noqa: E402
                    modula_stages)
from trainproc import train_in  # noqa: E402

L = 2                                                # digits: sequences of T = 2L+2 = 6 tokens
TINY_TRAIN = ["--steps", "10", "--pretrain-steps", "5", "--n-layer", "1", "--n-embd", "32",
              "--batch-size", "8", "--eval-examples", "10", "--digits", "3"]


@pytest.mark.parametrize("variant", ["flan", "res"])
@pytest.mark.parametrize("active", [None, UNIVERSAL, 3])
def test_fused_matches_naive(variant, active):
    torch.manual_seed(0)
    N, I, O, n = 7, 37, 53, 5
    layer = MoDULALinear(nn.Linear(I, O), MoDULAConfig(variant=variant, num_domains=n)).double()
    for p in (layer.universal_B, layer.lora_B, layer.router.weight):
        nn.init.normal_(p)                           # B = 0 would make this test trivial
    layer.active = active
    x, dy = torch.randn(N, I).double(), torch.randn(N, O).double()
    assert_paths_match(layer, x, dy)


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_update_is_zero_after_reset(variant):
    torch.manual_seed(0)
    layer = MoDULALinear(nn.Linear(37, 53), MoDULAConfig(variant=variant))
    for p in (layer.universal_B, layer.lora_B):
        nn.init.normal_(p)
    layer.reset_parameters()
    x = torch.randn(9, 37)
    for active in (None, UNIVERSAL, 0):
        layer.active = active
        assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("variant", ["flan", "res"])
@pytest.mark.parametrize("I,O,n", [(37, 53, 5), (16, 64, 1)])
def test_param_formulas(variant, I, O, n):
    cfg = MoDULAConfig(variant=variant, num_domains=n)
    layer = MoDULALinear(nn.Linear(I, O), cfg)
    real = {"universal": layer.universal_A.numel() + layer.universal_B.numel(),
            "domain": layer.lora_A[0].numel() + layer.lora_B[0].numel(),
            "router": layer.router.weight.numel(), "total": count_trainable(layer)}
    assert real == {part: modula_num_params(I, O, cfg, part) for part in real}


@pytest.mark.parametrize("field,value", [("variant", "serial"), ("universal_rank", 0),
                                         ("domain_rank", -8), ("num_domains", 0),
                                         ("alpha", 0.0), ("stage_steps", (1.0, 1.0))])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MoDULAConfig.{field}="):
        MoDULAConfig(**{field: value})


# ----------------------------------------------------------------------------- stages, in process
# A small copy of train.py's stage loop, so that each stage can be checked on its own.


def tiny_model(layer_cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tasks.VOCAB_SIZE, block_size=2 * L + 2, n_layer=1,
                          n_embd=16, n_head=1))
    return model, inject(model, lambda lin, name: layer_cls(lin, cfg), cfg.targets)


def run_stage(model, layers, stage, domains, steps=3):
    """What train.py does with a Stage: setup, train only its params (AdamW, no weight decay),
    on_batch with domain ids, LM loss plus extra_loss."""
    domain_of = torch.tensor([domains.index(t) if t in domains else -1 for t in tasks.ALL_TASKS])
    if stage.setup is not None:
        stage.setup(layers)
    params = stage.params(layers)
    model.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = tasks.task_ids_for(stage.tasks, 8, gen)
        x, y = tasks.lm_inputs(*tasks.make_batch(ids, L, "train", gen))
        if stage.on_batch is not None:
            stage.on_batch(layers, domain_of[ids])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if stage.extra_loss is not None:
            loss = loss + stage.extra_loss(layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def snapshot(layers):
    return [{k: p.detach().clone() for k, p in m.named_parameters() if not k.startswith("base.")}
            for m in layers]


def changed(before, layers):
    """Per layer: parameter name -> bool tensor of the entries that differ from `before`."""
    return [{k: p.detach() != before[i][k] for k, p in m.named_parameters() if k in before[i]}
            for i, m in enumerate(layers)]


def expect_only(diff, allowed):
    """Every entry in `allowed` (name -> index into the parameter) changed, and nothing else."""
    for layer_diff in diff:
        for name, d in layer_diff.items():
            want = torch.zeros_like(d)
            if name in allowed:
                want[allowed[name]] = True
            assert torch.equal(d, want), f"{name}: changed {int(d.sum())} of {d.numel()} entries"


def adapted_sizes(layers):
    return [(m.base.in_features, m.base.out_features) for m in layers]


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_each_stage_changes_only_its_parameters(variant):
    domains = ("add1", "neg", "mul3")
    cfg = MoDULAConfig(variant=variant, num_domains=len(domains), targets=("q", "up", "down"))
    model, layers = tiny_model(MoDULALinear, cfg)
    plan = modula_stages(cfg, domains, tasks.GENERAL)
    assert [s.name for s in plan] == ["universal", "domain add1", "domain neg", "domain mul3", "router"]
    assert plan[0].tasks == plan[-1].tasks == (tasks.GENERAL, *domains)   # universal data: everything
    everything = slice(None)
    for stage in plan:
        before = snapshot(layers)
        run_stage(model, layers, stage, domains)
        if stage.name == "universal":
            allowed = {"universal_A": everything, "universal_B": everything}
        elif stage.name == "router":
            allowed = {"router.weight": everything}
        else:
            i = domains.index(stage.name.split()[1])
            allowed = {"lora_A": i, "lora_B": i}
        expect_only(changed(before, layers), allowed)


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_adding_a_domain_leaves_old_experts_bit_identical(variant):
    domains, new = ("add1", "neg"), "subst"
    cfg = MoDULAConfig(variant=variant, num_domains=len(domains), targets=("q", "up", "down"))
    model, layers = tiny_model(MoDULALinear, cfg)
    for stage in modula_stages(cfg, domains, tasks.GENERAL):
        run_stage(model, layers, stage, domains, steps=2)
    before = snapshot(layers)
    for m in layers:
        append_expert(m)
        assert torch.equal(m.router.weight[-1], m.router.weight[:-1].mean(0))   # a new domain's row: the mean
        assert not m.lora_B[-1].any()                # the new expert's update starts at 0
    n = len(domains)
    grown_cfg = MoDULAConfig(variant=variant, num_domains=n + 1, targets=cfg.targets)
    plan = modula_stages(grown_cfg, (*domains, new), tasks.GENERAL, new=new)
    assert [s.name for s in plan] == [f"domain {new}", "router"]
    grown = snapshot(layers)
    for stage in plan:
        run_stage(model, layers, stage, (*domains, new), steps=2)
    for m, old in zip(layers, before):
        for name in ("universal_A", "universal_B"):
            assert torch.equal(getattr(m, name), old[name])
        assert torch.equal(m.lora_A[:n], old["lora_A"]) and torch.equal(m.lora_B[:n], old["lora_B"])
    everything = slice(None)
    diff = changed(grown, layers)
    expect_only(diff, {"lora_A": n, "lora_B": n, "router.weight": everything})
    touched = sum(int(d.sum()) for layer_diff in diff for d in layer_diff.values())
    assert touched == sum(modula_num_params(I, O, grown_cfg, "domain")
                          + modula_num_params(I, O, grown_cfg, "router")
                          for I, O in adapted_sizes(layers))


# ----------------------------------------------------------------------------- train.py


def run_train(tmp_path, *args, out):
    return train_in(tmp_path, *args, *TINY_TRAIN, out=out)


def test_train_py_runs_the_stages_and_adds_a_domain(tmp_path):
    """--exclude-task, then --add-domain: per-stage counts match the formulas of modula_num_params exactly."""
    m = run_train(tmp_path, "--method", "modula", "--variant", "flan", "--exclude-task", "addpos",
                  out="four")
    assert m["tasks"] == ["add1", "subst", "neg", "mul3"]
    assert [s["stage"] for s in m["stages"]] == ["universal", "domain add1", "domain subst",
                                                 "domain neg", "domain mul3", "router"]
    cfg = MoDULAConfig(variant="flan", num_domains=4)
    D = 32
    sizes = [(D, D)] * 4 + [(D, 4 * D), (4 * D, D)]  # q k v o up down, one block
    formula = lambda part, c=cfg: sum(modula_num_params(I, O, c, part) for I, O in sizes)
    assert [s["params_changed"] for s in m["stages"]] == [
        formula("universal"), *[formula("domain")] * 4, formula("router")]
    assert m["optimizer_steps"] == sum(s["steps"] for s in m["stages"]) > m["steps"]   # --steps: a budget
    assert set(m["oracle_routing_accuracy"]) == set(m["tasks"])      # each domain through its expert
    assert all(0 <= a <= 1 for a in m["oracle_routing_accuracy"].values())

    m2 = run_train(tmp_path, "--method", "modula", "--add-domain", "addpos", "--init-adapter",
                   str(tmp_path / "four" / "adapter.safetensors"), out="five")
    grown = MoDULAConfig(variant="flan", num_domains=5)
    add = m2["add_domain"]
    assert m2["tasks"][-1] == "addpos" and m2["config"]["num_domains"] == 5
    assert [s["stage"] for s in m2["stages"]] == ["domain addpos", "router"]
    assert add["params_touched"] == formula("domain", grown) + formula("router", grown)
    assert add["touched_share"] < 0.25
    assert set(add["accuracy_before"]) == set(add["accuracy_after"]) == {tasks.GENERAL, *tasks.TASKS}

