"""torchrun: two CPU processes (gloo) train like one process on the same global batch, and only
rank 0 writes files and prints the table."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from trainproc import REPO, TRAIN, run_train

TINY = ["--method", "lora", "--steps", "3", "--pretrain-steps", "3", "--n-layer", "1", "--n-embd", "32",
        "--batch-size", "8", "--eval-examples", "10", "--digits", "3"]


def test_two_processes_match_one(tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
         *TINY, "--out", "run"], cwd=tmp_path / "two", env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    one = run_train(tmp_path / "one", {"one": [*TINY, "--out", "run"]})["one"]  # meanwhile, one process
    out, err = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]

    # rank 0 alone wrote the base, the outputs and the table
    assert len(os.listdir(tmp_path / "two" / "out" / "base")) == 1
    assert sorted(os.listdir(tmp_path / "two" / "run")) == ["adapter.safetensors", "ckpt.pt", "metrics.json"]
    assert out.count("mean task accuracy") == 1

    two_m, one_m = (json.loads((tmp_path / d / "run" / "metrics.json").read_text()) for d in ("two", "one"))
    assert (two_m["processes"], one_m["processes"]) == (2, 1)
    # the same global batch: the loss of the last step agrees to float32 rounding (gradients are
    # averaged over ranks in a different order), and so do the trained adapters
    assert abs(two_m["stages"][0]["final_loss"] - one_m["stages"][0]["final_loss"]) < 1e-5
    two_a, one_a = (load_file(tmp_path / d / "run" / "adapter.safetensors") for d in ("two", "one"))
    assert two_a.keys() == one_a.keys()
    for k in one_a:
        torch.testing.assert_close(two_a[k], one_a[k], rtol=0, atol=1e-4, msg=k)
