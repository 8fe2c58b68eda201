"""Bad input to train.py: one line on stderr naming the problem, a non-zero exit, nothing half-written.

Every case is a process running train.py (tests/trainproc.py), and each test checks its own: the
exit status, the one `train.py: ...` line, and that the output folder holds no metrics.json, no
adapter and no temporary file.
"""
import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from common import base_hash, inject, save_adapter
from gpt import GPT, GPTConfig, save_checkpoint
from lora import LoRAConfig, LoRALinear
from trainproc import run_train

TINY = ["--steps", "3", "--batch-size", "4", "--eval-examples", "4", "--digits", "3", "--pretrain-steps", "2",
        "--n-layer", "1", "--n-embd", "16"]
GPT_CFG = dict(vocab_size=32, block_size=8, n_layer=1, n_head=1, n_embd=16)   # 2L+2 = 8


def tiny_base(seed, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**GPT_CFG, **kw}))


def lora_adapter(base: GPT, path, method="lora", **meta):
    """An adapter file as train.py writes it, for a LoRA on `base`."""
    cfg = LoRAConfig()
    inject(base, lambda lin, name: LoRALinear(lin, cfg), cfg.targets)
    save_adapter(base, str(path), {"method": method, "config": dataclasses.asdict(cfg),
                                   "layer": "LoRALinear", "base_sha256": base_hash(base), **meta})


def files(tmp):
    """Everything the cases read: two bases, a too-small one, adapters, broken and foreign files."""
    f = dict(base=tmp / "base.pt", other=tmp / "other.pt", small=tmp / "small.pt",
             trunc_ckpt=tmp / "trunc.pt", foreign_ckpt=tmp / "foreign.pt",
             adapter=tmp / "lora.safetensors", trunc_adapter=tmp / "trunc.safetensors", gpt2=tmp / "gpt2")
    save_checkpoint(tiny_base(0), f["base"])
    save_checkpoint(tiny_base(1), f["other"])
    save_checkpoint(tiny_base(0, block_size=4), f["small"])
    f["trunc_ckpt"].write_bytes(f["base"].read_bytes()[:2000])
    torch.save({"weights": torch.zeros(3)}, f["foreign_ckpt"])
    lora_adapter(tiny_base(0), f["adapter"])
    f["trunc_adapter"].write_bytes(f["adapter"].read_bytes()[:300])
    f["gpt2"].mkdir()
    save_file({"wte.weight": torch.zeros(32, 16)}, f["gpt2"] / "model.safetensors")  # no adapter meta
    (tmp / "out_is_a_file").write_text("not a folder")                   # the case's --out
    for case, src in [("resume_trunc", "trunc_ckpt"), ("resume_foreign", "base")]:
        (tmp / case).mkdir()
        (tmp / case / "ckpt.pt").write_bytes(f[src].read_bytes())
    return f


# case: (train.py arguments, text the one line must contain). {name} is a file from files().
CASES = {
    "unknown_method": (["--method", "nosuch"], "unknown method 'nosuch'"),
    "unknown_variant": (["--method", "molora", "--variant", "nosuch"], "unknown variant 'nosuch'"),
    "rank_zero": (["--method", "lora", "--cfg", "rank=0"], "LoRAConfig.rank=0"),
    "rank_negative": (["--method", "molora", "--cfg", "rank=-2"], "MoLoRAConfig.rank=-2"),
    "top_k_above_experts": (["--method", "molora", "--cfg", "num_experts=4", "--cfg", "top_k=5"],
                            "MoLoRAConfig.top_k=5"),
    "top_k_zero": (["--method", "molora", "--cfg", "top_k=0"], "MoLoRAConfig.top_k=0"),
    "dropout_one": (["--method", "lora", "--cfg", "dropout=1.0"], "LoRAConfig.dropout=1.0"),
    "dropout_negative": (["--method", "molora", "--cfg", "dropout=-0.1"], "MoLoRAConfig.dropout=-0.1"),
    "unknown_field": (["--method", "lora", "--cfg", "nosuch=1"], "nosuch"),
    "rank_not_an_integer": (["--method", "molora", "--cfg", "rank=2.5"], "MoLoRAConfig.rank=2.5: must be an integer"),
    "flag_not_a_bool": (["--method", "molora", "--cfg", "renormalize=maybe"],
                        "MoLoRAConfig.renormalize='maybe': must be true or false"),
    "targets_not_a_list": (["--method", "lora", "--cfg", "targets=down"], "LoRAConfig.targets='down': must be a list"),
    "top1_renormalised": (["--method", "malora", "--cfg", "top_k=1"], "MALoRAConfig.renormalize=True"),
    "out_is_a_file": (["--method", "lora"], "exists and is not a folder"),
    "cfg_syntax": (["--method", "lora", "--cfg", "rank"], "expected FIELD=VALUE"),
    "negative_steps": (["--method", "lora", "--steps", "-1"], "--steps -1: must be >= 0"),
    "zero_lr": (["--method", "lora", "--lr", "0"], "--lr 0.0: must be a positive number"),
    "missing_checkpoint": (["--method", "lora", "--init-from", "{tmp}/nope.pt"], "nope.pt: no such file"),
    "truncated_checkpoint": (["--method", "lora", "--init-from", "{trunc_ckpt}"], "trunc.pt: unreadable"),
    "foreign_checkpoint": (["--method", "lora", "--init-from", "{foreign_ckpt}"],
                           "foreign.pt: not a moe-lora-gpt checkpoint"),
    "foreign_safetensors": (["--method", "lora", "--init-from", "{adapter}"],
                            "lora.safetensors: cannot read GPT-2 sizes"),
    "model_too_small": (["--method", "lora", "--init-from", "{small}"], "too small for the tasks"),
    "missing_adapter": (["--method", "lora", "--init-from", "{base}", "--init-adapter", "{tmp}/nope"],
                        "nope: no such adapter file"),
    "truncated_adapter": (["--method", "lora", "--init-from", "{base}", "--init-adapter",
                           "{trunc_adapter}"], "trunc.safetensors: not a readable adapter file"),
    "foreign_adapter": (["--method", "lora", "--init-from", "{base}", "--init-adapter",
                         "{gpt2}/model.safetensors"], "adapter method is None, this run's is 'lora'"),
    "adapter_wrong_method": (["--method", "molora", "--init-from", "{base}", "--init-adapter",
                              "{adapter}"], "adapter method is 'lora', this run's is 'molora'"),
    "adapter_wrong_base": (["--method", "lora", "--init-from", "{other}", "--init-adapter",
                            "{adapter}"], "adapter was trained on another base model"),
    "adapter_shape_mismatch": (["--method", "lora", "--init-from", "{base}", "--init-adapter",
                                "{adapter}", "--cfg", "rank=4"], "shape mismatch for blocks.0"),
    "resume_without_checkpoint": (["--method", "lora", "--init-from", "{base}", "--resume"],
                                  "--resume: no checkpoint"),
    "resume_trunc": (["--method", "lora", "--init-from", "{base}", "--resume"],
                     "ckpt.pt: unreadable checkpoint"),
    "resume_foreign": (["--method", "lora", "--init-from", "{base}", "--resume"],
                       "ckpt.pt: not a training checkpoint"),
    "nonfinite_loss": (["--method", "lora", "--init-from", "{base}", "--lr", "1e30", "--ckpt-every", "1"],
                       "loss is nan at step 1; kept the last good checkpoint"),
}
if not torch.cuda.is_available():
    CASES["no_cuda"] = (["--method", "lora", "--device", "cuda"], "--device cuda: no CUDA device")
CASES["malora_shared_rank"] = (["--method", "malora", "--cfg", "rank=12", "--cfg", "shared_rank=8"],
                               "MALoRAConfig.shared_rank=8")
CASES["unknown_domain_added"] = (["--method", "modula", "--add-domain", "nosuch"], "unknown task 'nosuch'")
CASES["unknown_domain_excluded"] = (["--method", "modula", "--exclude-task", "nosuch"],
                                    "unknown task 'nosuch'")
CASES["task_of_another_family"] = (["--method", "lora", "--family", "shared", "--exclude-task", "add1"],
                                   "unknown task 'add1' in --family shared; choose one of: swap1")
CASES["router_only_without_adapter"] = (["--method", "moa", "--router-only"], "--router-only needs --init-adapter")
CASES["router_only_no_router"] = (["--method", "lora", "--router-only"],
                                  "--router-only needs --init-adapter and a method with domain experts")
CASES["negative_train_examples"] = (["--method", "lora", "--train-examples", "-1"], "--train-examples -1: must be >= 0")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case (tests/trainproc.py: a process each); returns (tmp, {name: CompletedProcess})."""
    tmp = tmp_path_factory.mktemp("errors")
    f = {k: str(v) for k, v in files(tmp).items()}
    return tmp, run_train(tmp, {name: [*TINY, *[a.format(tmp=tmp, **f) for a in args], "--out", tmp / name]
                                for name, (args, _) in CASES.items()})


def error_line(stderr: str) -> str:
    """The one line of a failed run. Progress bars (carriage-return updates) may come before it."""
    lines = [s for s in re.split(r"[\r\n]+", stderr) if s.strip()]
    assert "Traceback" not in stderr, stderr
    assert sum(s.startswith("train.py:") for s in lines) == 1, stderr
    assert lines[-1].startswith("train.py:"), stderr
    return lines[-1]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_line(results, name):
    tmp, procs = results
    proc = procs[name]
    assert proc.returncode != 0, proc.stdout
    line = error_line(proc.stderr)
    assert CASES[name][1] in line
    if name != "nonfinite_loss":                                 # no progress bar ran: one line in all
        assert proc.stderr.count("\n") == 1, proc.stderr
    out = tmp / name
    left = sorted(os.listdir(out)) if out.is_dir() else []
    assert "metrics.json" not in left and "adapter.safetensors" not in left
    assert not [n for n in left if n.endswith(".tmp")], left


def test_nonfinite_loss_keeps_the_last_good_checkpoint(results):
    tmp, procs = results
    assert procs["nonfinite_loss"].returncode != 0
    ckpt = torch.load(tmp / "nonfinite_loss" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1                                     # written after step 0, before the nan
    assert all(t.isfinite().all() for t in ckpt["adapter"].values())
    assert json.loads(json.dumps(ckpt["run"]))["lr"] == 1e30
