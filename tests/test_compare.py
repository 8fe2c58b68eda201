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
    parents = {r.after for r in runs if r.after}          # one level only: --reuse's needs_files
    assert parents and all(r.after is None for r in runs if r.name in parents)
    for block, family in (("main", "maps"), ("shared", "shared")):
        one = [r for r in runs if r.task and r.block == block]
        assert [r.task for r in one] == list(tasks.FAMILIES[family])
        for r in one:                                     # its task alone, all the steps of a joint run
            assert sorted(r.args[i + 1] for i, a in enumerate(r.args) if a == "--exclude-task") == \
                sorted(set(tasks.FAMILIES[family]) - {r.task})
            assert ("--family" in r.args) == (family == "shared")
    matched = next(r for r in runs if r.name == "molora-matched")
    assert "rank=3" in matched.args and "alpha=6" in matched.args
    assert "rank=16" in next(r for r in runs if r.row == compare.LORA_MATCHED).args     # 8 experts x rank 2
    assert all(r.args[0] == "--method" for r in runs)
    assert {r.lr for r in runs} <= set(compare.tune_table(2))          # every run has a tuned lr
    for r in runs:                                        # the finite block, and only it, has a fixed set
        assert (r.block == "finite") == ("--train-examples" in r.args) == r.row.endswith(compare.FINITE)
    by_row = {r.row: r for r in runs}
    for v in ("Flan", "Res"):                             # MoDULA: the longer router stage, and the
        main, side = by_row[f"MoDULA-{v}"], by_row[f"MoDULA-{v}{compare.SHORT_ROUTER}"]   # paper's beside it
        assert main.args == side.args + compare.MODULA_ROUTER and main.lr == side.lr
    cfg = dict(x.split("=") for x in compare.MODULA_ROUTER[1::2])     # the default run's router stage:
    assert float(cfg["router_lr_scale"]) * 3e-3 == pytest.approx(1e-2, rel=1e-3)   # 1e-2 at the chosen 3e-3
    assert json.loads(cfg["stage_steps"])[2] * 300 == 600                           # 600 steps of a 300 budget
    assert all(compare.MODULA_ROUTER[1] in r.args for r in runs if r.row.startswith("MoDULA-Res") and
               not r.row.endswith(compare.SHORT_ROUTER))  # every MoDULA-Res row that a check compares
    for added, control in compare.CONTROL.items():        # the control: same start, router stage only
        add, ctl = (next(r for r in runs if r.row == x) for x in (added, control))
        assert add.after == ctl.after and "--router-only" in ctl.args and "--add-domain" in add.args
        assert ctl.args[:ctl.args.index("--router-only")] == add.args[:add.args.index("--add-domain")] + (
            "--exclude-task", compare.NEW)


def test_size_curves():
    """Every method has at least three sizes on the same linears, each a row of the run table with
    the main row among them; the rows differ only in their rank fields."""
    rows = {r.row: r for r in compare.run_table(2, 3)}
    for curve, members in compare.curves(2).items():
        assert len(members) >= 3 and compare.MAIN_SIZE[curve] in members
        args = [rows[m].args for m in members]
        strip = lambda a: tuple(x for x in a if not x.split("=")[0] in ("rank", "alpha", "shared_rank",
                                                                          "domain_rank", "universal_rank"))
        assert len({strip(x) for x in args}) == 1, curve
        assert all(rows[m].seeds in (None, compare.SIZE_SEEDS) for m in members)


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


def record(row, seed, acc, task=None, general=0.5, params=100, tps=1000.0, steps=300):
    return {"row": row, "seed": seed, "task": task, "general_accuracy": general,
            "stages": [{"steps": steps}],
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


def test_budget_columns_steps_tokens_and_per_digit():
    """A row's optimiser steps and tokens sum over its runs (the per-task LoRAs: five runs); the
    per-digit mean is each task's own run's; records from an older train.py show a dash."""
    def rec(row, task, digit, seed=0):
        r = record(row, seed, 0.5, task=task)
        return {**r, "tokens_trained": 300 * 64 * 14,
                "per_task_digit_accuracy": {t: digit for t in tasks.TASKS}}
    recs = [rec("per task", t, 0.9 if t == "addpos" else 1.0) for t in tasks.TASKS]
    recs += [rec("mix", None, 0.8), record("old", 0, 0.5)]
    S = compare.summarize(recs)
    assert S["per task"][0]["opt_steps"] == 5 * 300 and S["per task"][0]["tokens"] == 5 * 300 * 64 * 14
    assert S["per task"][0]["digit_mean"] == pytest.approx(100 * (4 + 0.9) / 5)
    assert S["mix"][0]["opt_steps"] == 300 and S["mix"][0]["digit_mean"] == pytest.approx(80)
    assert S["old"][0]["tokens"] is None and S["old"][0]["digit_mean"] is None
    table = "\n".join(compare.table(S, ["per task", "mix", "old"], "maps", {}))
    assert "| per task | 500 |" in table and "| 98.0 | 50.0 | 1,500 | 1,344,000 |" in table
    assert "| old | 100 |" in table and "| — | 50.0 | 300 | — |" in table
    apart = "\n".join(compare.table(compare.summarize(recs, {"maps": tasks.TASKS[:4]}), ["per task"], "maps",
                                    {"maps": tasks.TASKS[:4]}))
    assert "| mean | addpos (apart) |" in apart and "| 50.0 | 50.0 | 100.0 | 50.0 | 1,500 |" in apart   # per-digit: 4 tasks


def seeds(values, **extra):
    return [{"seed": i, "mean": v, "general": 100.0, "base_general": 100.0, "tps": 1000.0, **extra}
            for i, v in enumerate(values)]


def test_t_quantile_and_interval():
    for n, t in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (10 ** 5, 1.960)]:
        assert compare.t_quantile(n) == pytest.approx(t, abs=1e-3)    # textbook two-sided 95 % values
    assert compare.t_quantile(4, 0.95) == pytest.approx(2.132, abs=1e-3)
    m, lo, hi = compare.interval([1, 2, 3, 4, 5])                    # s = sqrt(2.5), 4 degrees of freedom
    assert (m, lo, hi) == pytest.approx((3, 3 - 2.776 * 0.5 ** 0.5, 3 + 2.776 * 0.5 ** 0.5), abs=1e-3)


def test_verdict_rule():
    base = [70, 75, 80, 72, 78]
    rows = lambda *ds: {name: seeds([x + dx for x, dx in zip(base, d)]) for name, d in zip("abc", ds)}
    S = rows([10.2, 9.8, 10.1, 10.0, 9.9], [0] * 5, [0.2, 0.8, 0.5, 0.4, 0.6])
    assert compare.beats(S, "a", "b")[0] == "holds"                  # clear win
    assert compare.beats(S, "b", "a")[0] == "contradicted"           # clear loss
    assert compare.at_least(S, "a", "b")[0] == "holds"
    assert compare.at_least(S, "b", "a")[0] == "contradicted"        # worse by far more than TOL
    assert compare.beats(S, "c", "b")[0] == "contradicted"           # a sure gain, but under TOL
    assert compare.at_least(S, "c", "b")[0] == "holds"
    assert compare.at_least(S, "b", "c")[0] == "holds"               # 0.5 worse: within TOL
    verdict, text = compare.beats(S, "a", "b")
    assert text.startswith("a 85.0 ± 4.1 vs b 75.0 ± 4.1 (Δ +10.0, 95 % CI +9.8 to +10.2, n = 5)")
    noisy = rows([30, -20, 25, -15, 30], [0] * 5, [-1.5, 0, -0.5, -2.5, -0.5])
    assert compare.beats(noisy, "a", "b")[0] == "inconclusive"       # +10 on average, interval -21 to +41
    assert compare.at_least(noisy, "a", "b")[0] == "inconclusive"
    assert compare.at_least(noisy, "c", "b")[0] == "inconclusive"    # -1 on average, straddles -TOL
    few = {k: v[:4] for k, v in S.items()}                           # 4 seeds: no verdict
    assert compare.beats(few, "a", "b") == ("inconclusive", "a 84.3 ± 4.3 vs b 74.2 ± 4.3 (Δ +10.0, "
                                            "95 % CI +9.8 to +10.3, n = 4 < 5; the interval alone: holds)")
    S["d"] = seeds([x + 10 for x in base[:3]])                       # paired over the 3 shared seeds
    assert "n = 3 < 5" in compare.beats(S, "d", "b")[1]


def test_judge_below_and_combining():
    assert compare.judge([0.8, 0.82, 0.79, 0.81, 0.8], 1, below=True)[0] == "holds"
    assert compare.judge([1.4, 1.5, 1.45, 1.5, 1.42], 1, below=True)[0] == "contradicted"
    assert compare.judge([0.5, 1.5, 0.7, 1.4, 0.9], 1, below=True)[0] == "inconclusive"
    assert compare.judge([0.8] * 5, 1, below=True, spec=".2f")[1] == "0.80, 95 % CI 0.80 to 0.80, n = 5"
    assert compare.all_of(["holds", "holds"]) == "holds"
    assert compare.all_of(["holds", "inconclusive"]) == "inconclusive"
    assert compare.all_of(["inconclusive", "contradicted"]) == "contradicted"
    assert [compare.negate(v) for v in ("holds", "contradicted", "inconclusive")] == \
        ["contradicted", "holds", "inconclusive"]


def test_checks_on_synthetic_rows():
    S = {"LoRA, one per task": seeds([90, 91, 92, 90, 91]), "LoRA, mixture": seeds([60, 62, 61, 60, 61]),
         "MoLoRA soft": seeds([85, 86, 84, 85, 86]), "MoLoRA top-2": seeds([61, 61, 62, 60, 61])}
    got = {claim: v for _, claim, v, _, _ in compare.verdicts(S)}
    assert got["Interference: one LoRA on the mixture is below one LoRA per task"] == "holds"
    assert got["Every mixture method recovers part of the gap (beats the mixture LoRA)"] == "inconclusive"
    assert got["Soft routing >= top-2 (MoLoRA, same E and r; top-1 not run)"] == "holds"
    assert got["Residual: MoDULA-Res >= MoDULA-Flan"] == "not run"    # its runs are missing
    assert got["Raising the rank overfits MoLoRA sooner than MALoRA (finite data)"] == "not run"
    S["LoRA, mixture"] = seeds([84, 85, 85, 84, 86])                 # top-2 now clearly below it
    recovers = next(v for _, claim, v, _, _ in compare.verdicts(S) if claim.startswith("Every mixture"))
    assert recovers == "contradicted"
    S["MALoRA"] = seeds([80] * 5, tps=1000.0)
    S["MoLoRA top-2, parameters matched to MALoRA"] = seeds([80] * 5, tps=800.0)
    step = next((v, ours) for n, _, v, ours, _ in compare.verdicts(S) if n == "6")
    assert step == ("holds", "MALoRA step / MoLoRA's (whole CPU train step): 0.80, 95 % CI 0.80 to 0.80, n = 5")
    S["MoDULA-Res"] = seeds([50] * 5, general=97.5, base_general=100.0)   # 2.5 below the base: out
    assert next(v for n, c, v, _, _ in compare.verdicts(S) if "general task" in c) == "contradicted"
    check = lambda start: next((v, ours) for _, c, v, ours, _ in compare.verdicts(S) if c.startswith(start))
    S["MoLoRA top-2"] = seeds([61, 61, 62, 60, 61], params=1000)
    S[compare.LORA_MATCHED] = seeds([70, 71, 69, 70, 72], params=1000)
    assert check("MoLoRA top-2 beats one LoRA with as many")[0] == "contradicted"   # 9 points below it
    S[compare.LORA_MATCHED] = seeds([50, 51, 49, 50, 52], params=1000)
    assert check("MoLoRA top-2 beats one LoRA with as many")[0] == "holds"


def test_premise_is_a_difference_of_gains_between_families():
    """Check 9: (row - MoLoRA top-2) in the shared family minus the same in the maps family, per seed."""
    sh = compare.SHARED
    S = {"MoLoRA top-2": seeds([60, 61, 62, 60, 61]), "MoSLD p=0.1": seeds([60, 61, 62, 60, 61]),
         "MoLoRA top-2" + sh: seeds([70, 70, 70, 70, 70]), "MoSLD p=0.1" + sh: seeds([75, 76, 74, 75, 75])}
    check = lambda: next((v, ours) for _, c, v, ours, _ in compare.verdicts(S) if "shared input side" in c)
    verdict, ours = check()
    assert verdict == "holds" and "(difference +5.0, 95 % CI" in ours   # +5 there, 0 here
    S["MoSLD p=0.1"] = seeds([65, 66, 67, 65, 66])                    # +5 in the maps family too
    assert check()[0] == "contradicted"
    S["MoSLD p=0.1"] = seeds([65, 56, 67, 55, 66])
    assert check()[0] == "inconclusive"
    assert next(v for _, c, v, _, _ in compare.verdicts(S) if "universal expert" in c) == "not run"


def test_headline_tasks_and_chosen_lrs():
    """A task that its per-task reference does not learn (>= 95 %) leaves the headline mean; the
    chosen lr is the best validation mean, the smaller one on a tie."""
    ref = [record("LoRA, one per task", s, 0.99 if t != "addpos" else 0.5, task=t) for s in (0, 1)
           for t in tasks.TASKS]
    head = compare.headline_tasks(ref + [record("mix", 0, 0.5)])
    assert head["maps"] == tasks.TASKS[:4] and head["shared"] == tasks.FAMILIES["shared"]
    staged = {**record("staged", 0, 0.9), "oracle_routing_accuracy": {t: 1.0 if t != "addpos" else 0.0
                                                                      for t in tasks.TASKS}}
    S = compare.summarize(ref + [staged], head)
    assert S["LoRA, one per task"][0]["mean"] == pytest.approx(99.0)
    assert S["staged"][0]["own_expert"] == 100.0                     # over the tasks the mean counts
    tune = lambda key, lr, val: {"run": f"tune-{key}-lr{lr:g}", "val_accuracy": {"add1": val, "neg": val}}
    recs = [tune("lora", 3e-3, 0.5), tune("lora", 1e-2, 0.7), tune("moa", 3e-3, 0.6), tune("moa", 1e-2, 0.6)]
    assert compare.GRID_COLUMNS == (1e-3, 3e-3, 1e-2)
    assert compare.chosen_lrs(recs) == {"lora": (1e-2, [None, 50.0, 70.0]), "moa": (3e-3, [None, 60.0, 60.0])}
    recs.append(tune("malora-r16-finite", 1e-3, 0.8))                # the sweep's grid reaches lower
    assert compare.chosen_lrs(recs)["malora-r16-finite"] == (1e-3, [80.0, None, None])


def add_run(row, seed, drop, touched=41472, new=0.5, old=0.9):
    """An add-a-domain record; its own retrain estimate (a default MoLoRA) must not be used."""
    rec = record(row, seed, old, params=152064)
    rec["per_task_accuracy"][compare.NEW] = new
    rec["add_domain"] = {"params_touched": touched, "max_old_task_drop": drop,
                         "molora_retrain_params": 626688, "touched_share": touched / 626688}
    return rec


def test_check7_denominator_control_and_per_seed_drops():
    """Old-task drops are taken against the control (the same extra router stage, no new domain),
    per seed; the share is of the MoLoRA soft that was run."""
    check7 = lambda recs: next((v, ours) for n, _, v, ours, _ in compare.verdicts(compare.summarize(recs))
                               if n == "7")
    soft = [record("MoLoRA soft", s, 0.5, params=184320) for s in range(5)]
    control = lambda accs: [record(compare.CONTROL[row], s, a, general=0.5) for row in compare.ADDED
                            for s, a in enumerate(accs)]
    olds = [0.9, 0.92, 0.89, 0.9, 0.9]                               # old tasks' accuracy after adding
    recs = [add_run(row, s, 0.1, old=o) for row in compare.ADDED for s, o in enumerate(olds)]
    verdict, ours = check7(soft + recs + control([0.9, 0.9, 0.9, 0.9, 0.9]))
    assert verdict == "holds"
    assert "against the control +0.0, +0.0, +1.0, +0.0, +0.0 pts" in ours   # old tasks and general
    assert "without the extra router stage: +10.0, +10.0" in ours    # the adapter before: reported apart
    assert "touched 41,472 of the 184,320 parameters of MoLoRA soft (share %: 22.5, 95 % CI 22.5 to 22.5" in ours
    small = [record("MoLoRA soft", s, 0.5, params=100000) for s in range(5)]
    assert check7(small + recs + control([0.9] * 5))[0] == "contradicted"   # 41.5 % of the MoLoRA that ran
    assert check7(soft + recs + control([0.95] * 5))[0] == "contradicted"   # 5 points below the control
    assert check7(soft + recs + control([0.9, 1.0, 0.8, 1.0, 0.8]))[0] == "inconclusive"
    assert check7(soft[:3] + recs + control([0.9] * 5))[0] == "inconclusive"   # 3 seeds of MoLoRA soft
    assert check7(soft + recs)[0] == "not run"                       # no control, no verdict


def test_rank_sweep_runs_and_verdict():
    runs, tune = {r.name: r for r in compare.run_table(2, 3)}, compare.tune_table(2)
    for r in compare.SWEEP_RANKS:
        assert f"rank={r}" in runs[f"finite-molora-r{r}"].args and "top2" in runs[f"finite-molora-r{r}"].args
        assert runs[f"finite-malora-r{r}"].args[:2] == ("--method", "malora")
        for method in ("molora", "malora"):                       # each rank at its own lr, tuned on
            run = runs[f"finite-{method}-r{r}"]                    # its own finite training set
            assert run.lr.endswith(f"-r{r}-finite") and tune[run.lr] == run.args
            assert compare.lr_grid(run.lr) == compare.SWEEP_LR_GRID
    assert compare.lr_grid("malora") == compare.LR_GRID
    row = lambda label, r: compare.sweep_row(label, r) + compare.FINITE
    molora, malora = compare.SWEEP
    r1, r2, r3 = compare.SWEEP_RANKS
    check5 = lambda S: next((v, ours) for n, _, v, ours, _ in compare.verdicts(S) if n == "5")
    five = lambda v: seeds([v + dv for dv in (0, 1, -1, 0.5, -0.5)])
    S = {**{row(molora, r): five(v) for r, v in zip(compare.SWEEP_RANKS, (70, 90, 60))},
         **{row(malora, r): five(v) for r, v in zip(compare.SWEEP_RANKS, (70, 85, 86))}}
    verdict, ours = check5(S)
    assert verdict == "holds" and f"(peak r={r2}; peak - r={r3}: +30.0, 95 % CI +30.0 to +30.0, n = 5)" in ours
    assert f"(peak r={r3}; peak - r={r3}: +0.0" in ours
    S[row(malora, r3)] = five(50)                                    # MALoRA falls too, but peaks later?
    assert check5(S)[0] == "contradicted"                            # no: both peak at r2, MALoRA falls
    S[row(malora, r2)] = five(60)
    S[row(malora, r3)] = five(95)
    assert check5(S)[0] == "holds"                                   # MALoRA peaks at the largest rank
    S[row(malora, r1)] = five(99)                                    # MALoRA peaks first ...
    S[row(malora, r3)] = seeds([99, 55, 99, 55, 99])                 # ... and its fall is noise: undecided
    assert check5(S)[0] == "inconclusive"
    flat = {row(m, r): five(100) for m in compare.SWEEP for r in compare.SWEEP_RANKS}
    assert check5(flat) == ("contradicted", "; ".join(
        f"{label} r={r1}/{r2}/{r3}: 100.0/100.0/100.0 (peak r={r1}; peak - r={r3}: +0.0, 95 % CI +0.0 to +0.0, n = 5)"
        for label in compare.SWEEP))
    three = {k: v[:3] for k, v in S.items()}
    assert check5(three)[0] == "inconclusive"                        # 3 seeds


def test_rank_sweep_fall_is_overfitting_only_if_the_training_set_was_fit():
    """A largest rank whose final training loss is clearly above the peak's (paired over seeds) may
    not have trained: its fall is no evidence of overfitting, so that part of check 5 is
    inconclusive, and says why; a loss above the peak's in some seeds only does not count."""
    row = lambda label, r: compare.sweep_row(label, r) + compare.FINITE
    molora, malora = compare.SWEEP
    r1, r2, r3 = compare.SWEEP_RANKS
    five = lambda v, loss: seeds([v + dv for dv in (0, 1, -1, 0.5, -0.5)], final_loss=loss)
    S = {row(molora, r1): five(90, 0.2), row(molora, r2): five(85, 0.1), row(molora, r3): five(40, 0.05),
         **{row(malora, r): five(90, 0.1) for r in compare.SWEEP_RANKS}}
    check5 = lambda: next((v, ours) for n, _, v, ours, _ in compare.verdicts(S) if n == "5")
    assert check5()[0] == "holds"                                    # r3 fits better and generalises worse
    S[row(molora, r3)] = seeds([40, 41, 39, 40.5, 39.5], final_loss=0.9)   # r3 did not fit its training set
    verdict, ours = check5()
    assert verdict == "inconclusive"
    assert f"r={r3} fit its training set worse than the peak (final training loss 0.900 ± 0.000 against " \
           "0.200 ± 0.000), so its fall is no evidence of overfitting" in ours
    noisy = [0.1, 0.4, 0.05, 0.3, 0.1]                               # above 0.2 in two seeds of five
    S[row(molora, r3)] = [{**s, "final_loss": v} for s, v in zip(five(40, 0), noisy)]
    assert check5()[0] == "holds"


def test_recorded_runs_of_an_earlier_results_json(tmp_path):
    path = tmp_path / "results.json"
    assert compare.recorded(str(path)) == {}                         # none yet
    path.write_text("{not json")
    assert compare.recorded(str(path)) == {}
    rec = {"run": "lora", "seed": 3, "command": ["train.py", "--method", "lora"]}
    path.write_text(json.dumps({"budget": {}, "runs": [rec], "notes": []}))
    assert compare.recorded(str(path)) == {("lora", 3): rec}


def test_report_rebuilds_results_md_from_results_json(tmp_path):
    recs = [{**record(row, s, acc), "run": row, "command": ["train.py", "--init-from", "out/base/x.pt"]}
            for row, acc in (("LoRA, mixture", 0.5), ("MoLoRA soft", 0.9)) for s in range(5)]
    recs += [{"run": "tune-lora-lr0.003", "row": "lora", "seed": 1000, "task": None, **record("lora", 1000, 0.5),
              "val_accuracy": {"add1": 0.25}, "command": []}]
    budget = {"quick": False, "steps": 300, "rank": 2, "seeds": 5, "eval_examples": 300, "jobs": 2}
    (tmp_path / "results.json").write_text(json.dumps(
        {"budget": budget, "runs": recs, "notes": ["lora seed 3: FAILED, exit 1"]}))
    compare.rejudge(str(tmp_path / "results.json"))
    md = (tmp_path / "RESULTS.md").read_text()
    assert "base out/base/x.pt (shared)" in md and "Verdicts re-judged from these same runs" in md
    assert "| LoRA, mixture | 100 | 50.0 ± 0.0 |" in md and "| MoLoRA soft | 100 | 90.0 ± 0.0 |" in md
    assert "| 2 | Soft routing >= top-2 (MoLoRA, same E and r; top-1 not run) | **not run** |" in md
    assert "| lora | — | 25.0 | — | 0.003 |" in md                    # the lr table: one grid point ran
    notes = md.split("## Notes")[1]
    assert "- lora seed 3: FAILED, exit 1" in notes


def test_reuse_plan_takes_same_commands_but_not_a_parent_that_a_training_run_needs():
    """--reuse: a record with the same command stands for its run, unless the run is finished on
    disk anyway, or is the parent of a run that will train (that run needs the parent's adapter
    file, and a record has none); under --collect nothing trains, so parents are taken too."""
    parent, child = compare.Run("minus", "r1", (), "x"), compare.Run("add", "r2", (), "x", after="minus")
    other = compare.Run("lora", "r3", (), "x")
    jobs = [(run, s) for s in (0, 1) for run in (parent, child, other)]
    command = lambda run, s: ["train.py", run.name, str(s)]
    earlier = {(run.name, s): {"command": command(run, s)} for run, s in jobs}
    earlier["add", 1] = {"command": ["train.py", "add", "changed"]}        # seed 1's child must train
    earlier["lora", 0] = {"command": ["train.py", "lora", "0", "--lr", "1"]}   # another lr: train again
    none_on_disk = lambda run, s: False
    assert compare.reuse_plan(jobs, earlier, command, none_on_disk) == {
        ("minus", 0), ("add", 0), ("lora", 1)}                        # not minus 1: add 1 needs its file
    assert compare.reuse_plan(jobs, earlier, command, none_on_disk, training=False) == {
        ("minus", 0), ("add", 0), ("lora", 1), ("minus", 1)}
    minus1_on_disk = lambda run, s: (run.name, s) == ("minus", 1)
    assert ("minus", 1) not in compare.reuse_plan(jobs, earlier, command, minus1_on_disk)   # its folder is used
    assert compare.reuse_plan(jobs, {}, command, none_on_disk) == set()   # no earlier results.json
