"""train.py end to end on a tiny config: a valid metrics.json, and the same result twice."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "6", "--pretrain-steps", "6", "--n-layer", "1", "--n-embd", "32",
        "--batch-size", "8", "--eval-examples", "8", "--digits", "3"]


def run_train(tmp_path, *args, out="run"):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *args, *TINY, "--out", str(tmp_path / out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("method", ["lora", "molora"])
def test_smoke_run_writes_valid_metrics(tmp_path, method):
    proc = run_train(tmp_path, "--method", method)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("method", "per_task_accuracy", "general_accuracy", "trainable_params",
                "total_params", "tokens_per_second", "steps"):
        assert key in m
    assert m["method"] == method and m["steps"] == m["optimizer_steps"] == 6
    assert 0 < m["trainable_params"] < m["total_params"] and m["tokens_per_second"] > 0
    assert all(0 <= a <= 1 for a in m["per_task_accuracy"].values())
    assert (tmp_path / "run" / "adapter.safetensors").exists()


def test_same_seed_same_result(tmp_path):
    runs = []
    for out in ("a", "b"):
        proc = run_train(tmp_path, "--method", "molora", "--variant", "top2", "--seed", "3", out=out)
        assert proc.returncode == 0, proc.stderr
        runs.append((tmp_path / out / "adapter.safetensors").read_bytes())
    assert runs[0] == runs[1]                       # bit-identical adapters on CPU


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_compiled_cuda_run_learns_like_eager(tmp_path, mode):
    """--device cuda --compile (CUDA graphs by default) trains the same model as eager: the final
    losses agree to float32 reduction-order noise."""
    losses = {}
    for out, extra in (("eager", []), ("compiled", ["--compile", "--compile-mode", mode])):
        proc = run_train(tmp_path, "--method", "molora", "--variant", "top2", "--device", "cuda",
                         *extra, out=out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[out] = json.loads((tmp_path / out / "metrics.json").read_text())["stages"][-1]["final_loss"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)
