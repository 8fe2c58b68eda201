"""The staged schedules and the config plumbing, pinned.

Stages (MoDULA §3 / Fig. 2, MoA): what each Stage of modula_stages / moa_stages trains on, how
many of the run's steps it gets, which parameters it hands the optimiser (the router stage: the
routers alone), and that a new domain's router row starts as the mean of the old rows. That each
stage changes exactly its parameters and leaves the others bit-identical, through a real optimiser,
is checked in tests/test_modula.py and tests/test_moa.py (test_each_stage_changes_only_its_parameters,
test_adding_a_domain_leaves_old_experts_bit_identical).

Plumbing: the default configs carry the papers' sizes, MALoRAConfig.from_molora and the
MALoRA-Small preset give the sizes of MALoRA §3.2 / Tables 1, 8, 11, train.py's --variant presets
reach the config, and MoSLD's per-depth expert counts land on the right blocks for depths 4, 8, 32,
in a model built here and in the adapter train.py writes.
"""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import tasks
from common import append_expert, inject, layer_config
from gpt import GPT, GPTConfig
from lora import LoRAConfig
from malora import MALORA_SMALL, MALoRAConfig
from moa import MoAConfig, MoALinear, moa_stages
from modula import UNIVERSAL, MoDULAConfig, MoDULALinear, modula_stages
from molora import MoLoRAConfig
from mosld import MoSLDConfig, MoSLDLinear
from trainproc import run_train

DOMAINS = ("add1", "neg", "mul3")

# ----------------------------------------------------------------------------- stages


def tiny(layer_cls, cfg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tasks.VOCAB_SIZE, block_size=8, n_layer=1, n_embd=16, n_head=1))
    return inject(model, lambda lin, name: layer_cls(lin, cfg), cfg.targets)


def same(a, b):
    """The same parameter objects, in order."""
    return len(a) == len(b) and all(p is q for p, q in zip(a, b))


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_modula_plan(variant):
    """Stage 1 on the universal data (here the general task and every domain), stage 2 once per
    domain on that domain alone, stage 3 on the mixture; the step shares add up to stage_steps."""
    cfg = MoDULAConfig(variant=variant, num_domains=3, stage_steps=(0.3, 1.2, 2.0), targets=("q", "up"))
    layers = tiny(MoDULALinear, cfg)
    plan = modula_stages(cfg, DOMAINS, tasks.GENERAL)
    assert [s.tasks for s in plan] == [(tasks.GENERAL, *DOMAINS), *[(t,) for t in DOMAINS],
                                       (tasks.GENERAL, *DOMAINS)]
    assert [s.steps_frac for s in plan] == pytest.approx([0.3, 0.4, 0.4, 0.4, 2.0])
    assert all(s.extra_loss is None and s.on_batch is None for s in plan)   # the LM loss alone
    assert same(plan[0].params(layers), [p for m in layers for p in (m.universal_A, m.universal_B)])
    for s in plan[1:-1]:
        assert same(s.params(layers), [p for m in layers for p in (m.lora_A, m.lora_B)])
    assert same(plan[-1].params(layers), [m.router.weight for m in layers])   # routers only
    for s, active in zip(plan, [UNIVERSAL, 0, 1, 2, None]):                 # the forward of each stage
        s.setup(layers)
        assert all(m.active == active for m in layers), s.name


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_moa_plan(routing):
    """Stage 1: LoRA j on domain j alone; stage 2: the routers alone, on the domains (no general
    task: it has no label), told each batch's domains, with the router CE added."""
    cfg = MoAConfig(num_domains=3, routing=routing, stage_steps=(0.9, 0.7), targets=("q", "up"))
    layers = tiny(MoALinear, cfg)
    plan = moa_stages(cfg, DOMAINS, tasks.GENERAL)
    assert [s.tasks for s in plan] == [*[(t,) for t in DOMAINS], DOMAINS]
    assert [s.steps_frac for s in plan] == pytest.approx([0.3, 0.3, 0.3, 0.7])
    for j, s in enumerate(plan[:-1]):
        assert s.extra_loss is None and s.on_batch is None
        assert same(s.params(layers), [p for m in layers for p in (m.lora_A, m.lora_B)])
        s.setup(layers)
        assert all(m.active == j for m in layers)
    router = plan[-1]
    assert same(router.params(layers), [m.router.weight for m in layers])
    router.setup(layers)
    gold = torch.tensor([2, 0, 1, 1])
    router.on_batch(layers, gold)
    assert all(m.active is None and m.gold is gold for m in layers)


@pytest.mark.parametrize("make", ["modula", "moa"])
def test_new_domain_plan(make):
    """Adding a domain: its own expert's stage, then the router stage again; nothing else."""
    grown = (*DOMAINS, "subst")
    if make == "modula":
        plan = modula_stages(MoDULAConfig(num_domains=4), grown, tasks.GENERAL, new="subst")
        assert [(s.name, s.tasks) for s in plan] == [("domain subst", ("subst",)),
                                                     ("router", (tasks.GENERAL, *grown))]
    else:
        plan = moa_stages(MoAConfig(num_domains=4), grown, tasks.GENERAL, new="subst")
        assert [(s.name, s.tasks) for s in plan] == [("lora subst", ("subst",)), ("router", grown)]
    assert plan[0].steps_frac == pytest.approx(1.0 / 4)             # one domain's share of stage 2


@pytest.mark.parametrize("case", ["flan", "res", "moa"])
def test_new_domain_router_row_is_the_mean_of_the_old_rows(case):
    """append_expert: the old experts and router rows copied bit for bit, the new B zero (its update
    starts at 0), the new router row the mean of the old ones (MoDULA §4.4 extended by one row)."""
    torch.manual_seed(0)
    if case == "moa":
        layer = MoALinear(nn.Linear(11, 13), MoAConfig(num_domains=3))
    else:
        layer = MoDULALinear(nn.Linear(11, 13), MoDULAConfig(variant=case, num_domains=3))
    for p in (layer.lora_A, layer.lora_B, layer.router.weight):
        nn.init.normal_(p)
    A, B, W = layer.lora_A.clone(), layer.lora_B.clone(), layer.router.weight.clone()
    append_expert(layer)
    assert torch.equal(layer.lora_A[:3], A) and torch.equal(layer.lora_B[:3], B)
    assert layer.lora_A.shape[0] == 4 and not layer.lora_B[3].any() and layer.lora_A[3].any()
    assert torch.equal(layer.router.weight[:-1], W)
    torch.testing.assert_close(layer.router.weight[-1], W.mean(0))
    assert all(p.requires_grad for p in (layer.lora_A, layer.lora_B, layer.router.weight))


# ----------------------------------------------------------------------------- config plumbing


def test_defaults_are_the_papers_sizes():
    assert (LoRAConfig().rank, LoRAConfig().alpha) == (8, 16.0)
    m = MoLoRAConfig()                                     # MALoRA's MoLoRA baseline (Table 8)
    assert (m.num_experts, m.rank, m.alpha, m.top_k, m.aux_loss_coef) == (8, 8, 16.0, None, 0.01)
    s = MoSLDConfig()                                      # MoSLD §4.3
    assert (s.num_experts, s.rank, s.alpha, s.top_k, s.drop_a, s.drop_b, s.targets) == (
        (8, 6, 4, 2), 8, 16.0, 2, 0.1, 0.0, ("q", "v"))
    a = MALoRAConfig()                                     # MALoRA Tables 8-9, inter-domain
    assert (a.num_experts, a.rank, a.shared_rank, a.alpha, a.top_k, a.beta, a.aux_loss_coef,
            a.dropout, a.renormalize) == (8, 12, 32, 24.0, 2, 1.0, 0.01, 0.05, True)
    assert "o" not in a.targets
    d = MoDULAConfig()                                     # MoDULA §4.1: r_* = 16, r_d = 8
    assert (d.variant, d.universal_rank, d.domain_rank, d.negative_slope) == ("res", 16, 8, 0.01)
    assert MoAConfig().rank == 8


@pytest.mark.parametrize("r0,lam,r_bar,S", [(4, 0.5, 6, 16), (8, 0.5, 12, 32), (16, 0.5, 24, 64),
                                            (32, 0.5, 48, 128), (8, 0.25, 14, 16)])
def test_malora_from_molora(r0, lam, r_bar, S):
    """S = lambda r0 E, r-bar = (2 - lambda) r0 (§3.2), alpha = 2 r-bar (alpha / r-bar = 2, the
    baseline's 16 / 8); E = 8 and lambda = 0.5 give Table 11's pairs (6, 16) .. (48, 128)."""
    cfg = MALoRAConfig.from_molora(rank=r0, num_experts=8, lam=lam, beta=1.25)
    assert (cfg.num_experts, cfg.rank, cfg.shared_rank, cfg.alpha, cfg.beta) == (8, r_bar, S, 2.0 * r_bar, 1.25)


def test_malora_small_preset():
    small = MALoRAConfig(**MALORA_SMALL)                   # Table 1: r-bar = 8, d = 22
    assert (small.rank, small.shared_rank, small.alpha / small.rank) == (8, 22, 2.0)


def mosld_counts(depth):
    """Experts of each block's q and v, in a GPT of this depth injected as train.py does."""
    cfg = MoSLDConfig()
    model = GPT(GPTConfig(vocab_size=tasks.VOCAB_SIZE, block_size=8, n_layer=depth, n_embd=8, n_head=1))
    inject(model, lambda lin, name: MoSLDLinear(lin, layer_config(cfg, name, depth)), cfg.targets)
    counts = [(b.attn.q.lora_B.shape[0], b.attn.v.router.weight.shape[0]) for b in model.blocks]
    assert all(q == v for q, v in counts)
    return [q for q, _ in counts]


@pytest.mark.parametrize("depth,expect", [(4, [8, 6, 4, 2]), (8, [8, 8, 6, 6, 4, 4, 2, 2]),
                                          (32, [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8)])
def test_mosld_experts_land_on_their_blocks(depth, expect):
    """(8, 6, 4, 2): four equal blocks of consecutive layers, from the input side (§4.3)."""
    assert mosld_counts(depth) == expect


def test_train_py_presets_and_mosld_depths(tmp_path):
    """--variant presets reach the config train.py runs, and its MoSLD model of depth 4 has the
    pattern's experts in blocks 0..3 (read from the adapter it writes). --steps 0: build, evaluate."""
    tiny_run = ["--steps", "0", "--pretrain-steps", "1", "--n-layer", "4", "--n-embd", "32",
                "--batch-size", "4", "--digits", "1", "--eval-examples", "1"]
    runs = {"small": ["--method", "malora", "--variant", "small"],
            "increasing": ["--method", "mosld", "--variant", "increasing"]}
    procs = run_train(tmp_path, {n: [*a, *tiny_run, "--out", tmp_path / n] for n, a in runs.items()},
                      parallel=1)                                    # one at a time: one base
    assert all(p.returncode == 0 for p in procs.values()), {n: p.stderr[-500:] for n, p in procs.items()}
    cfg = {n: json.loads((tmp_path / n / "metrics.json").read_text())["config"] for n in runs}
    assert (cfg["small"]["rank"], cfg["small"]["shared_rank"], cfg["small"]["alpha"]) == (8, 22, 16.0)
    assert cfg["increasing"]["num_experts"] == [2, 4, 6, 8]          # §5.2 / Fig. 7
    weights = load_file(tmp_path / "increasing" / "adapter.safetensors")
    assert [weights[f"blocks.{i}.attn.{t}.lora_B"].shape[0] for i in range(4) for t in "qv"] == [
        2, 2, 4, 4, 6, 6, 8, 8]


@pytest.mark.parametrize("make", [lambda: MoDULAConfig(), lambda: MoAConfig()], ids=["modula", "moa"])
def test_router_stage_runs_at_router_lr_scale(make):
    """The router stage's peak lr is router_lr_scale x --lr (10 by default; 1 is one lr for all),
    the other stages at --lr; a scale that is not > 0 is refused naming the field."""
    cfg = dataclasses.replace(make(), num_domains=len(DOMAINS))
    stages_fn = modula_stages if isinstance(cfg, MoDULAConfig) else moa_stages
    for scale in (10.0, 1.0, 2.5):
        plan = stages_fn(dataclasses.replace(cfg, router_lr_scale=scale), DOMAINS, tasks.GENERAL)
        assert [s.lr_scale for s in plan] == [1.0] * (len(plan) - 1) + [scale]
        assert plan[-1].name == "router"
    assert cfg.router_lr_scale == 10.0
    with pytest.raises(ValueError, match=f"{type(cfg).__name__}.router_lr_scale=0: must be > 0"):
        dataclasses.replace(cfg, router_lr_scale=0)
