"""train.py's files: --init-from a project checkpoint or a GPT-2 model.safetensors, adapters saved
and loaded again (base hash, method), and --resume after a kill giving the same run bit for bit."""
import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from common import adapter_meta, base_hash, inject, load_adapter, save_adapter
from gpt import GPT, GPTConfig, load_pretrained, save_checkpoint
from lora import LoRAConfig, LoRALinear
from molora import MoLoRAConfig, MoLoRALinear
from test_gpt import write_gpt2
from trainproc import run_train

GPT_CFG = dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)   # tasks: V 32, T 2L+2 = 8
TINY = ["--batch-size", "8", "--eval-examples", "8", "--digits", "3"]

def train(tmp, runs: dict, **kw) -> dict:
    """name -> train.py arguments; each run writes to tmp/name unless it says --out (trainproc.py)."""
    return run_train(tmp, {name: [*TINY, "--out", tmp / name, *args] for name, args in runs.items()}, **kw)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def metrics(tmp, out):
    return json.loads((tmp / out / "metrics.json").read_text())


def same_result(tmp, a, b):
    """Two runs ended with the same adapter, bit for bit, and the same accuracies and losses."""
    ta, tb = (load_file(tmp / o / "adapter.safetensors") for o in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=0, msg=k)
    ma, mb = metrics(tmp, a), metrics(tmp, b)
    for key in ("per_task_accuracy", "general_accuracy", "base_accuracy", "trainable_params"):
        assert ma[key] == mb[key], key
    assert [s["final_loss"] for s in ma["stages"]] == [s["final_loss"] for s in mb["stages"]]


def tiny_base(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**GPT_CFG))
    with torch.no_grad():
        for p in model.parameters():                   # off the 0 / 1 init, as a trained model
            p += 0.05 * torch.randn_like(p)
    return model


# ----------------------------------------------------------------------------- --init-from

def test_init_from_checkpoint_and_gpt2_safetensors(tmp_path):
    """One set of weights in three files trains to the same first loss: ours, GPT-2 names written
    by hand, and (when transformers is installed) GPT2LMHeadModel.save_pretrained."""
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        (tmp_path / "hf").mkdir()
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "hf")
        model = load_pretrained(tmp_path / "hf" / "model.safetensors")
    else:
        model = tiny_base()
    save_checkpoint(model, tmp_path / "ckpt.pt")
    (tmp_path / "gpt2").mkdir()
    write_gpt2(model, tmp_path / "gpt2")
    sources = {"ckpt": tmp_path / "ckpt.pt", "gpt2": tmp_path / "gpt2" / "model.safetensors"}
    if transformers is not None:
        sources["hf"] = tmp_path / "hf"
    for proc in train(tmp_path, {name: ["--method", "lora", "--init-from", path, "--steps", "1"]
                                 for name, path in sources.items()}).values():
        ok(proc)
    losses = {name: metrics(tmp_path, name)["stages"][0]["final_loss"] for name in sources}
    assert len(set(losses.values())) == 1, losses               # the loss at step 0 is the base's
    assert not (tmp_path / "out").exists()                      # nothing was pretrained
    m = metrics(tmp_path, "gpt2")
    assert m["total_params"] == model.num_params() + m["trainable_params"]


# ----------------------------------------------------------------------------- adapters

def lora_on(base, rank=2):
    cfg = LoRAConfig(rank=rank)
    inject(base, lambda lin, name: LoRALinear(lin, cfg), cfg.targets)
    return base


def test_base_hash_ignores_the_adapter_and_sees_the_base():
    model = tiny_base()
    before = base_hash(model)
    lora_on(model)
    assert base_hash(model) == before                           # same before and after inject
    with torch.no_grad():
        model.blocks[0].attn.q.lora_B.add_(1.0)
    assert base_hash(model) == before                           # training the adapter: same base
    with torch.no_grad():
        model.blocks[0].attn.q.base.weight[0, 0] += 1e-3
    assert base_hash(model) != before


def test_adapter_loads_into_a_fresh_model_and_refuses_others(tmp_path):
    model = lora_on(tiny_base())
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    path = str(tmp_path / "adapter.safetensors")
    meta = {"method": "lora", "config": dataclasses.asdict(LoRAConfig(rank=2)), "layer": "LoRALinear",
            "base_sha256": base_hash(model)}
    save_adapter(model, path, meta)
    assert adapter_meta(path) == json.loads(json.dumps(meta))

    fresh = lora_on(tiny_base())
    load_adapter(fresh, path)
    idx = torch.randint(0, 32, (3, 8))
    torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)

    with pytest.raises(ValueError, match="adapter was trained on another base model"):
        load_adapter(lora_on(tiny_base(seed=1)), path)
    other = tiny_base()
    cfg = MoLoRAConfig(num_experts=2, rank=2)
    inject(other, lambda lin, name: MoLoRALinear(lin, cfg), cfg.targets)
    with pytest.raises(ValueError, match=r"adapter holds LoRALinear layers \(method 'lora'\), this model has MoLoRALinear"):
        load_adapter(other, path)
    small = lora_on(tiny_base(), rank=1)
    b = small.blocks[0].attn.q.lora_B.detach().clone()
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(small, path)
    torch.testing.assert_close(small.blocks[0].attn.q.lora_B, b)   # untouched: checked before copying


# ----------------------------------------------------------------------------- --resume

def test_resume_after_a_kill_gives_the_uninterrupted_run(tmp_path):
    """Routed top-2 MoLoRA with dropout (so the RNG state matters), 6 steps, checkpoints every 2."""
    save_checkpoint(tiny_base(), tmp_path / "base.pt")
    run = ["--method", "molora", "--variant", "top2", "--cfg", "dropout=0.1", "--cfg", "num_experts=3",
           "--init-from", str(tmp_path / "base.pt"), "--steps", "6", "--ckpt-every", "2"]
    wave = train(tmp_path, {"whole": run, "killed": run}, kill_at={"killed": 2})
    ok(wave["whole"])
    killed = wave["killed"]
    assert killed.returncode == 9, killed.stderr[-2000:]
    left = sorted(os.listdir(tmp_path / "killed"))
    assert left == ["ckpt.pt", "ckpt.pt.tmp"]                   # no metrics, no adapter
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"] == 2
    shutil.copytree(tmp_path / "whole", tmp_path / "first")     # "whole" is resumed again below

    wave = train(tmp_path, {
        "changed": [*run, "--resume", "--lr", "0.01", "--out", tmp_path / "killed"],  # not the same run
        "killed": [*run, "--resume"],
        "whole": [*run, "--resume"],                                              # done: evaluates only
        "evaluated": ["--method", "molora", "--init-from", tmp_path / "base.pt", "--steps", "0",
                      "--init-adapter", tmp_path / "first" / "adapter.safetensors"]})
    changed, resumed, again, evaluated = (wave[k] for k in ("changed", "killed", "whole", "evaluated"))
    assert changed.returncode != 0
    assert changed.stderr.strip().endswith("was written with lr=0.001, this run has lr=0.01")
    ok(resumed)
    same_result(tmp_path, "first", "killed")
    ok(again)
    same_result(tmp_path, "first", "whole")

    # --init-adapter with --steps 0: the saved adapter, loaded into a fresh model, evaluates the same
    ok(evaluated)
    m, e = metrics(tmp_path, "first"), metrics(tmp_path, "evaluated")
    assert e["config"] == m["config"] and e["steps"] == 0
    assert (e["per_task_accuracy"], e["general_accuracy"]) == (m["per_task_accuracy"], m["general_accuracy"])
    ta, te = (load_file(tmp_path / o / "adapter.safetensors") for o in ("first", "evaluated"))
    assert all(torch.equal(ta[k], te[k]) for k in ta)
    meta = adapter_meta(str(tmp_path / "first" / "adapter.safetensors"))
    assert meta["method"] == "molora" and meta["layer"] == "MoLoRALinear"
    assert meta["targets"] == list(MoLoRAConfig().targets)
    assert meta["base_sha256"] == base_hash(tiny_base())
