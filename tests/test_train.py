"""train.py end to end on a tiny config, in this process (train.main): a valid metrics.json, and
the same result twice."""
import json

import pytest

from trainproc import train_in

TINY = ["--steps", "6", "--pretrain-steps", "6", "--n-layer", "1", "--n-embd", "32",
        "--batch-size", "8", "--eval-examples", "8", "--digits", "3"]


@pytest.fixture
def run_train(tmp_path):
    """train.main(ARGS + a tiny config) in this process, in tmp_path."""
    return lambda *args, out="run": train_in(tmp_path, *args, *TINY, out=out)


@pytest.mark.parametrize("method", ["lora", "molora"])
def test_smoke_run_writes_valid_metrics(tmp_path, run_train, method):
    run_train("--method", method)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("method", "per_task_accuracy", "general_accuracy", "trainable_params",
                "total_params", "tokens_per_second", "steps"):
        assert key in m
    assert m["method"] == method and m["steps"] == m["optimizer_steps"] == 6
    assert 0 < m["trainable_params"] < m["total_params"] and m["tokens_per_second"] > 0
    assert all(0 <= a <= 1 for a in m["per_task_accuracy"].values())
    assert (tmp_path / "run" / "adapter.safetensors").exists()


def test_tokens_trained_and_per_digit_accuracy_are_recorded(tmp_path, run_train):
    """tokens_trained = optimiser steps x batch x (2 digits + 2), exactly; per-digit accuracy is
    never below exact match."""
    m = run_train("--method", "lora")
    assert m["tokens_trained"] == 6 * 8 * (2 * 3 + 2)                 # TINY: 6 steps of 8, 3 digits
    for t, exact in m["per_task_accuracy"].items():
        assert exact <= m["per_task_digit_accuracy"][t] <= 1


def test_same_seed_same_result(tmp_path, run_train):
    runs = []
    for out in ("a", "b"):
        run_train("--method", "molora", "--variant", "top2", "--seed", "3", out=out)
        runs.append((tmp_path / out / "adapter.safetensors").read_bytes())
    assert runs[0] == runs[1]                       # bit-identical adapters on CPU


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_compiled_cuda_run_learns_like_eager(tmp_path, run_train, mode):
    """--device cuda --compile (CUDA graphs by default) trains the same model as eager: the final
    losses agree to float32 reduction-order noise."""
    losses = {}
    for out, extra in (("eager", []), ("compiled", ["--compile", "--compile-mode", mode])):
        run_train("--method", "molora", "--variant", "top2", "--device", "cuda", *extra, out=out)
        losses[out] = json.loads((tmp_path / out / "metrics.json").read_text())["stages"][-1]["final_loss"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)


def test_compiled_cpu_run_learns_like_eager(tmp_path, run_train):
    """The closest CPU check of the CUDA-graphs path: --compile with the mode CUDA uses by default
    (reduce-overhead, which on CPU compiles without graphs) trains the same model as eager through
    the same train() plumbing (the step function, the optimiser, the schedule)."""
    losses = {}
    for out, extra in (("eager", []), ("compiled", ["--compile", "--compile-mode", "reduce-overhead"])):
        m = run_train("--method", "molora", "--variant", "top2", *extra, out=out)   # eager: pretrains
        losses[out] = m["stages"][-1]["final_loss"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)


def test_family_finite_training_set_and_validation(tmp_path, run_train):
    """--family picks the tasks trained and evaluated; --train-examples trains on a fixed set (its
    epochs recorded); --val-examples scores the validation split of the trained tasks."""
    m = run_train("--method", "lora", "--family", "shared", "--train-examples", "4", "--val-examples", "5")
    assert m["family"] == "shared" and list(m["per_task_accuracy"]) == list(__import__("tasks").FAMILIES["shared"])
    assert set(m["base_accuracy"]) == {"copy", *m["per_task_accuracy"]}
    assert m["train_examples"] == 4 and m["epochs"] == pytest.approx(6 * 8 / (4 * 4))   # 6 steps of 8, 4 tasks
    assert set(m["val_accuracy"]) == set(m["per_task_accuracy"])
    plain = run_train("--method", "lora", out="plain")
    assert plain["family"] == "maps" and plain["epochs"] is None and "val_accuracy" not in plain


def test_router_only_trains_the_routers_of_the_adapter_alone(tmp_path, run_train):
    """--router-only: the control of --add-domain, the last stage (the routers) of the given
    adapter, with no new expert; every other adapter weight is left as it was."""
    from safetensors.torch import load_file
    first = run_train("--method", "moa", "--exclude-task", "mul3", out="first")
    again = run_train("--method", "moa", "--exclude-task", "mul3", "--router-only",
                      "--init-adapter", str(tmp_path / "first" / "adapter.safetensors"), out="again")
    assert [s["stage"] for s in again["stages"]] == ["router"] == [first["stages"][-1]["stage"]]
    assert again["stages"][0]["steps"] == first["stages"][-1]["steps"]          # the same router steps
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("first", "again"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and ("router" in k) != bool((a[k] == b[k]).all()), k
