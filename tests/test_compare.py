"""compare.py without training: the run list, resume, aggregation and verdicts on made-up numbers."""
import json

import pytest

import compare
import tasks

def test_run_table():
    runs = compare.run_table(2, 3)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    for i, r in enumerate(runs):                          # a run starts only from an earlier one
        assert r.after is None or r.after in names[:i]
    one = [r for r in runs if r.task]
    assert [r.task for r in one] == list(tasks.TASKS)
    for r in one:                                         # trains on its task alone, 1/n of the steps
        assert r.steps_frac == pytest.approx(1 / len(tasks.TASKS))
        assert sorted(r.args[i + 1] for i, a in enumerate(r.args) if a == "--exclude-task") == \
            sorted(set(tasks.TASKS) - {r.task})
    matched = next(r for r in runs if r.name == "molora-matched")
    assert "rank=3" in matched.args and "alpha=6" in matched.args
    assert all(r.args[0] == "--method" for r in runs)


def test_budget_cfg():
    assert compare.budget_cfg("lora", 0) == ()
    assert compare.budget_cfg("lora", 2) == ("--cfg", "rank=2", "--cfg", "alpha=4")
    assert compare.budget_cfg("malora", 8) == ("--cfg", "rank=12", "--cfg", "shared_rank=32", "--cfg", "alpha=24")
    assert compare.budget_cfg("modula", 8) == ("--cfg", "domain_rank=8", "--cfg", "universal_rank=16",
                                               "--cfg", "alpha=16")        # MoDULA's own defaults


def test_matched_rank():
    pytest.importorskip("malora")
    assert compare.matched_molora_rank(0) == 9     # MALoRA r-bar 12, S 32 ~ MoLoRA r 9 at D = 128


def test_resume_skips_only_the_same_finished_command(tmp_path):
    cmd = ["train.py", "--method", "lora", "--steps", "10"]
    assert not compare.finished(str(tmp_path), cmd)
    (tmp_path / "run.json").write_text(json.dumps({"command": cmd, "wall_seconds": 1.0}))
    assert not compare.finished(str(tmp_path), cmd)                   # no metrics.json yet
    (tmp_path / "metrics.json").write_text("{}")
    assert compare.finished(str(tmp_path), cmd)
    assert not compare.finished(str(tmp_path), cmd[:-1] + ["20"])     # another budget: run again


def record(row, seed, acc, task=None, general=0.5, params=100, tps=1000.0):
    return {"row": row, "seed": seed, "task": task, "general_accuracy": general,
            "per_task_accuracy": {t: acc for t in tasks.TASKS}, "base_accuracy": {tasks.GENERAL: 1.0},
            "trainable_params": params, "tokens_per_second": tps, "wall_seconds": 10.0}


def test_summarize_mean_std():
    recs = [record("mix", s, a) for s, a in [(0, 0.5), (1, 0.7)]]
    recs += [record("per task", s, 1.0 if t != "addpos" else 0.0, task=t) for s in (0, 1) for t in tasks.TASKS]
    recs += [record("per task", 2, 1.0, task=tasks.TASKS[0])]          # seed 2 incomplete: left out
    S = compare.summarize(recs)
    assert [s["mean"] for s in S["mix"]] == pytest.approx([50, 70])
    assert compare.fmt([s["mean"] for s in S["mix"]]) == "60.0 ± 14.1"
    assert compare.fmt([42.0]) == "42.0"
    per = S["per task"]
    assert [s["seed"] for s in per] == [0, 1]
    assert per[0]["params"] == 100 * len(tasks.TASKS) and per[0]["wall"] == 10.0 * len(tasks.TASKS)
    assert per[0]["acc"]["addpos"] == 0 and per[0]["acc"][tasks.TASKS[0]] == 100


def seeds(values, **extra):
    return [{"seed": i, "mean": v, "general": 100.0, "base_general": 100.0, "tps": 1000.0, **extra}
            for i, v in enumerate(values)]


def test_verdict_logic():
    S = {"a": seeds([80, 82, 81]), "b": seeds([70, 71, 72]), "c": seeds([80.5, 81.5, 80])}
    assert compare.beats(S, "a", "b")[0] == "holds"
    assert compare.beats(S, "b", "a")[0] == "does not hold"
    assert compare.beats(S, "a", "c")[0] == "does not hold"          # within TOL: no clear win
    assert compare.at_least(S, "a", "c")[0] == "holds"
    assert compare.at_least(S, "b", "a")[0] == "does not hold"
    noisy = {"a": seeds([90, 60, 90]), "b": seeds([70, 70, 70])}       # +10 on average, spread 17
    assert compare.beats(noisy, "a", "b")[0] == "does not hold"
    assert "Δ +10.0" in compare.beats(noisy, "a", "b")[1]


def test_checks_on_synthetic_rows():
    S = {"LoRA, one per task": seeds([90, 91, 92]), "LoRA, mixture": seeds([60, 62, 61]),
         "MoLoRA soft": seeds([85, 86, 84]), "MoLoRA top-2": seeds([61, 61, 62])}
    got = {claim: v for _, claim, v, _, _ in compare.verdicts(S)}
    assert got["Interference: one LoRA on the mixture is below one LoRA per task"] == "holds"
    assert got["Every mixture method recovers part of the gap (beats the mixture LoRA)"] == "does not hold"
    assert got["Soft routing >= top-2 (MoLoRA, same E and r; top-1 not run)"] == "holds"
    assert got["Residual: MoDULA-Res >= MoDULA-Flan"] == "not run"    # its runs are missing
    assert got["Raising the rank overfits MoLoRA sooner than MALoRA"] == "not run"
    S["MALoRA"] = seeds([80, 80, 80], tps=1000.0)
    S["MoLoRA top-2, parameters matched to MALoRA"] = seeds([80, 80, 80], tps=800.0)
    step = next((v, ours) for n, _, v, ours, _ in compare.verdicts(S) if n == "6")
    assert step == ("holds", "MALoRA step = 0.80 x MoLoRA's (whole CPU train step)")   # more tokens/s


def test_rank_sweep_runs_and_verdict():
    runs = {r.name: r for r in compare.run_table(2, 3)}
    for r in compare.SWEEP_RANKS:
        assert f"rank={r}" in runs[f"sweep-molora-r{r}"].args and "top2" in runs[f"sweep-molora-r{r}"].args
        assert runs[f"sweep-malora-r{r}"].args[:2] == ("--method", "malora")
    row = compare.sweep_row
    molora, malora = compare.SWEEP
    check5 = lambda S: next((v, ours) for n, _, v, ours, _ in compare.verdicts(S) if n == "5")
    S = {row(molora, 1): seeds([70, 71, 72]), row(molora, 2): seeds([90, 91, 92]),
         row(molora, 4): seeds([80, 81, 79]), row(molora, 8): seeds([60, 61, 62]),
         **{row(malora, r): seeds([v] * 3) for r, v in zip(compare.SWEEP_RANKS, (70, 80, 85, 86))}}
    verdict, ours = check5(S)
    assert verdict == "holds" and "peak r=2, then -30.0 by r=8" in ours and "peak r=8" in ours
    S[row(malora, 8)] = seeds([50, 50, 50])                          # MALoRA falls too, later peak
    assert check5(S)[0] == "holds"
    S[row(malora, 2)] = seeds([95, 95, 95])                          # MALoRA peaks first: no
    assert check5(S)[0] == "does not hold"
    flat = {row(m, r): seeds([100, 100, 100]) for m in compare.SWEEP for r in compare.SWEEP_RANKS}
    assert check5(flat) == ("does not hold", f"{molora} r=1/2/4/8: 100.0/100.0/100.0/100.0 (peak r=1, "
                            f"no fall after it); {malora} r=1/2/4/8: 100.0/100.0/100.0/100.0 (peak r=1, no fall after it)")
