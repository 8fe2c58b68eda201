"""Compare every method under one budget: same base model, data, steps and seeds.

    python compare.py --quick        # 1 seed, short runs: the whole pipeline in a few minutes
    python compare.py                # 5 seeds, the full budget; then read results/RESULTS.md
    python compare.py --report results/results.json   # RESULTS.md again from recorded runs, no training

Every run is `python train.py ...` in a subprocess, exactly what a user gets, writing into
<out>/runs/<run>/seed<k>/ (train.log, metrics.json, adapter). A run whose metrics.json is there and
whose run.json holds the same command is skipped, so an interrupted comparison resumes.
Writes <out>/results.json (every run), <out>/RESULTS.md (mean ± std over seeds; a verdict for each
qualitative claim of the papers beside the paper's numbers) and, with matplotlib, accuracy.png
and usage-<run>.png, the expert usage of every routed run (seed 0) as heatmaps.
A verdict is holds, contradicted or inconclusive, from the paired 95 % interval of the per-seed
difference (`judge`, `beats`, `at_least`); it needs at least MIN_SEEDS seeds.

Budget: every run gets the same --steps (a staged method runs each stage for the share of it that
its config's stage_steps sets; each per-task LoRA gets all the steps on its one task, as many
optimiser steps as a joint run takes in total) and the same per-expert --rank, with alpha = 2 rank,
so that every scaling alpha / r stays at the methods' default 2. All runs start from one base
model, pretrained once (seed 0).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

import tasks

ROOT = os.path.dirname(os.path.abspath(__file__))
NEW = tasks.TASKS[-1]          # the domain that the add-a-domain runs learn last
D_MODEL = 128                  # train.py's default --n-embd, for matching MoLoRA's parameters to MALoRA's
TOL = 1.0                      # accuracy points: a difference smaller than this is noise (verdicts)
MIN_SEEDS = 5                  # fewer seeds with both rows: every verdict is inconclusive
SWEEP_RANKS = (1, 2, 4, 8)     # check 5: per-expert ranks of the MoLoRA / MALoRA rank sweep
SWEEP = ("MoLoRA top-2", "MALoRA")
ROUTER4 = "[0.25,1.0,4.0]"     # MoDULA stage_steps with 4x the router steps of its default
MIX, PER_TASK, MATCHED = "LoRA, mixture", "LoRA, one per task", "MoLoRA top-2, parameters matched to MALoRA"
OWN_A = "MoLoRA top-2, q/v, E=5 (own A per expert)"     # MoSLD's experts without the shared A ("MoLA")
BUDGET_NOTE = """Why rank 2 by default, not the methods' own 8: on these tasks one rank-8 LoRA learns
every digit map of the mixture in 300 steps (add1/subst/neg/mul3 at 99.7-100% in a first
investigation), so nothing interferes and all methods tie at the ceiling. At rank 2 one LoRA no
longer holds the maps of all tasks, while a rank-2 LoRA per task still learns its own (the row
"LoRA, one per task", whose optimiser steps the table states): the interference the mixture methods
are meant to remove (check 1 below). A task that no run learns in the budget (0% everywhere) lowers
every mean alike."""

# ----------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true",
               help="smoke budget: 1 seed, 100 steps, 100 eval examples, output in results/quick")
p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 300; quick 100)")
p.add_argument("--seeds", type=int, default=None,
               help=f"seeds per run (default {MIN_SEEDS}, the fewest a verdict needs; quick 1)")
p.add_argument("--eval-examples", type=int, default=None,
               help="held-out examples per task (default 300; quick 100)")
p.add_argument("--rank", type=int, default=2,
               help="per-expert rank of every method (MALoRA: the MoLoRA rank it replaces; MoDULA: the "
                    "domain rank, universal 2x); 0 keeps each method's defaults")
p.add_argument("--lr", type=float, default=3e-3,
               help="peak learning rate of every run (default 3e-3: at train.py's 1e-3, 300 steps of "
                    "rank 2 leave every method near 0%%, so nothing can be compared)")
p.add_argument("--pretrain-steps", type=int, default=1500, help="pretraining steps of the shared base model")
p.add_argument("--jobs", type=int, default=2, help="train.py processes at once, one thread each")
p.add_argument("--out", default=None, help="output folder (default results; quick: results/quick)")
p.add_argument("--report", metavar="RESULTS_JSON", default=None,
               help="train nothing: rebuild RESULTS.md (and the plot) beside this results.json from the "
                    "runs it records, with this compare.py's tables and verdicts")


@dataclass
class Run:
    name: str                  # folder and key in results.json
    row: str                   # its row of the comparison table (the per-task LoRAs share one)
    args: tuple                # train.py arguments, --method first
    steps_frac: float = 1.0    # share of --steps
    after: str | None = None   # the run whose adapter this one starts from (--init-adapter)
    task: str | None = None    # a one-task run: the task its row takes from it
    table: bool = True         # a row of the comparison table (False: an add-a-domain first half)


def budget_cfg(method: str, r: int) -> tuple:
    """--cfg arguments that set `method` to per-expert rank r with alpha / rank = 2; r = 0: none."""
    if not r:
        return ()
    rb = round(1.5 * r)        # MALoRA replacing a rank-r MoLoRA: r-bar = (2 - 0.5) r, S = 0.5 r E (E = 8)
    fields = {"malora": {"rank": rb, "shared_rank": 4 * r, "alpha": 2 * rb},
              "modula": {"domain_rank": r, "universal_rank": 2 * r, "alpha": 2 * r}
              }.get(method, {"rank": r, "alpha": 2 * r})
    return tuple(a for k, v in fields.items() for a in ("--cfg", f"{k}={v}"))


def matched_molora_rank(r: int) -> int:
    """The MoLoRA rank (top-2, E = 8, MALoRA's targets) whose parameter count is closest to the
    MALoRA of this budget (MALoRA §3.3's formula), at the tiny GPT's shapes."""
    from malora import MALoRAConfig, malora_num_params
    from molora import MoLoRAConfig, molora_num_params
    D, H = D_MODEL, 4 * D_MODEL
    shapes = [(D, D)] * 3 + [(D, H), (H, D)]                 # q, k, v, up, down
    target = sum(malora_num_params(I, O, MALoRAConfig.from_molora(r) if r else MALoRAConfig())
                 for I, O in shapes)
    return min(range(1, 65), key=lambda rm: abs(target - sum(
        molora_num_params(I, O, MoLoRAConfig(rank=rm, top_k=2)) for I, O in shapes)))


def run_table(r: int, matched: int) -> list:
    """Every run of the comparison, in order. matched: the MoLoRA rank that matches MALoRA."""
    def m(method, *extra):
        return ("--method", method, *budget_cfg(method, r), *extra)
    only = lambda t: tuple(a for u in tasks.TASKS if u != t for a in ("--exclude-task", u))
    return [
        Run("lora", MIX, m("lora")),
        *[Run(f"lora-{t}", PER_TASK, m("lora", *only(t)), task=t)   # as many steps as a joint run
          for t in tasks.TASKS],
        Run("molora-soft", "MoLoRA soft", m("molora", "--variant", "soft")),
        Run("molora-top2", "MoLoRA top-2", m("molora", "--variant", "top2")),
        Run("molora-qv", OWN_A,
            m("molora", "--variant", "top2", "--cfg", 'targets=["q","v"]', "--cfg", "num_experts=5")),
        Run("malora", "MALoRA", m("malora")),
        Run("molora-matched", MATCHED, ("--method", "molora", "--variant", "top2", "--cfg", f"rank={matched}",
            "--cfg", f"alpha={2 * matched}", "--cfg", 'targets=["q","k","v","up","down"]')),
        Run("mosld", "MoSLD p=0.1", m("mosld")),
        Run("mosl", "MoSL p=0", m("mosld", "--variant", "mosl")),
        Run("mosld-p0.3", "MoSLD p=0.3", m("mosld", "--cfg", "drop_a=0.3")),
        Run("mosld-drop-b", "MoSLD dropout on B", m("mosld", "--variant", "drop-b")),
        Run("modula-flan", "MoDULA-Flan", m("modula", "--variant", "flan")),
        Run("modula-res", "MoDULA-Res", m("modula", "--variant", "res")),
        Run("modula-flan-router4", "MoDULA-Flan, 4x router steps",
            m("modula", "--variant", "flan", "--cfg", f"stage_steps={ROUTER4}")),
        Run("modula-res-router4", "MoDULA-Res, 4x router steps",
            m("modula", "--variant", "res", "--cfg", f"stage_steps={ROUTER4}")),
        Run("modula-res-minus", f"MoDULA-Res without {NEW}",
            m("modula", "--variant", "res", "--exclude-task", NEW), table=False),
        Run("modula-res-add", f"MoDULA-Res, {NEW} added later",
            m("modula", "--variant", "res", "--add-domain", NEW), after="modula-res-minus"),
        Run("moa", "MoA-style", m("moa")),
        Run("moa-minus", f"MoA-style without {NEW}", m("moa", "--exclude-task", NEW), table=False),
        Run("moa-add", f"MoA-style, {NEW} added later", m("moa", "--add-domain", NEW), after="moa-minus"),
        *[Run(f"sweep-{method}-r{rs}", sweep_row(label, rs), ("--method", method, *budget_cfg(method, rs),
              *variant), table=False)
          for rs in SWEEP_RANKS for method, label, variant in (("molora", SWEEP[0], ("--variant", "top2")),
                                                              ("malora", SWEEP[1], ()))],
    ]


def sweep_row(label: str, r: int) -> str:
    return f"{label}, rank {r}"


def finished(run_dir: str, cmd: list) -> bool:
    """metrics.json is there, written by this very command (resume: skip the run)."""
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            same = json.load(f)["command"] == cmd
    except (OSError, ValueError, KeyError):
        return False
    return same and os.path.exists(os.path.join(run_dir, "metrics.json"))


def execute(cmd: list, run_dir: str) -> str | None:
    """Run `python train.py ...` with its output in run_dir/train.log. None, or why it failed."""
    os.makedirs(run_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc:
        with open(os.path.join(run_dir, "train.log")) as log:
            lines = log.read().replace("\r", "\n").strip().splitlines() or ["(no output)"]
        return f"exit {rc}: {lines[-1]}"
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"command": cmd, "wall_seconds": time.perf_counter() - t0}, f)
    return None


# ----------------------------------------------------------------------------- aggregation


def mean_std(values) -> tuple:
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values, digits=1) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(records: list) -> dict:
    """row -> one dict per seed, in seed order: accuracy per task, mean, per-digit mean and general
    (in %), trainable parameters, optimiser steps, tokens trained, tokens/s and wall seconds (summed
    over the runs of a row), add-a-domain report."""
    rows = {}
    for rec in records:
        rows.setdefault(rec["row"], {}).setdefault(rec["seed"], []).append(rec)
    out = {}
    for row, by_seed in rows.items():
        for seed, rs in sorted(by_seed.items()):
            own = {r["task"]: r for r in rs if r["task"]}
            if own and set(own) != set(tasks.TASKS):
                continue                                # a one-task run of this seed is missing
            acc = {t: 100 * own.get(t, rs[0])["per_task_accuracy"][t] for t in tasks.TASKS}
            digit = [own.get(t, rs[0]).get("per_task_digit_accuracy", {}).get(t) for t in tasks.TASKS]
            out.setdefault(row, []).append({
                "digit_mean": None if None in digit else 100 * statistics.mean(digit),
                "opt_steps": sum(st["steps"] for r in rs for st in r["stages"]),     # every stage
                "tokens": sum(r.get("tokens_trained", 0) for r in rs) or None,
                "seed": seed, "acc": acc, "mean": statistics.mean(acc.values()), "new": acc[NEW],
                "general": 100 * statistics.mean(r["general_accuracy"] for r in rs),
                "base_general": 100 * rs[0]["base_accuracy"][tasks.GENERAL],
                "params": sum(r["trainable_params"] for r in rs),
                "tps": statistics.mean(r["tokens_per_second"] for r in rs),
                "wall": sum(r["wall_seconds"] for r in rs), "add_domain": rs[0].get("add_domain"),
                "own_expert": 100 * statistics.mean(rs[0]["oracle_routing_accuracy"].values())
                if "oracle_routing_accuracy" in rs[0] else None})     # over the run's own domains
    return out


def t_quantile(n: int, p: float = 0.975) -> float:
    """The p quantile of Student's t with n degrees of freedom, by bisection on its CDF. For an
    integer n, with th = atan(t / sqrt n) and c = cos^2 th, P(|T| < t) is a finite series:
    2/pi (th + sin th cos th (1 + 2/3 c + 2·4/(3·5) c^2 + ...)) for odd n, sin th (1 + 1/2 c +
    1·3/(2·4) c^2 + ...) for even n, with n // 2 terms in the series."""
    def inside(t):                                         # P(|T| < t)
        th = math.atan(t / math.sqrt(n))
        c, term, series, odd = math.cos(th) ** 2, 1.0, 1.0, n % 2
        for k in range(1, n // 2):
            term *= (2 * k - 1 + odd) / (2 * k + odd) * c          # odd: 2k / (2k+1); even: (2k-1) / 2k
            series += term
        if odd:
            return 2 / math.pi * (th + (math.sin(th) * math.cos(th) * series if n > 1 else 0.0))
        return math.sin(th) * series
    lo, hi = 0.0, 1e4
    for _ in range(100):
        lo, hi = ((lo + hi) / 2, hi) if inside((lo + hi) / 2) < 2 * p - 1 else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def interval(d: list) -> tuple:
    """Mean of d and its 95 % confidence interval (Student t, len(d) - 1 degrees of freedom)."""
    m, s = mean_std(d)
    half = t_quantile(len(d) - 1) * s / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return m, m - half, m + half


def judge(d: list, margin: float, below: bool = False, spec: str = "+.1f") -> tuple:
    """Verdict on the claim "the mean of d is above margin" (below=True: "below margin"), d one
    value per seed: holds if the whole 95 % interval is on the claimed side of margin,
    contradicted if it is wholly on the other side (the claim is ruled out), inconclusive if it
    straddles margin, and inconclusive with fewer than MIN_SEEDS values whatever the interval.
    Returns (verdict, "mean, 95 % CI lo to hi, n = ..." and, with too few seeds, what the
    interval alone says where it is not inconclusive)."""
    m, lo, hi = interval(d)
    if below:                                              # mean < margin  <=>  -mean > -margin
        lo, hi, margin = -hi, -lo, -margin
    by_ci = "holds" if lo > margin else "contradicted" if hi < margin else "inconclusive"
    lo, hi = (-hi, -lo) if below else (lo, hi)
    few = len(d) < MIN_SEEDS
    note = f"{m:{spec}}, 95 % CI {lo:{spec}} to {hi:{spec}}, n = {len(d)}" + f" < {MIN_SEEDS}" * few + \
        f"; the interval alone: {by_ci}" * (few and by_ci != "inconclusive")
    return ("inconclusive" if few else by_ci), note


def paired(S: dict, a: str, b: str, key="mean", f=lambda x, y: x - y) -> list:
    """f(a, b) of `key` for every seed that has both rows."""
    sb = {s["seed"]: s[key] for s in S[b]}
    d = [f(s[key], sb[s["seed"]]) for s in S[a] if s["seed"] in sb]
    if not d:
        raise KeyError(f"no seed has both {a} and {b}")
    return d


def versus(S, a, b, margin, key="mean") -> tuple:
    """Verdict on "a - b > margin", paired by seed, and the text: both rows, the difference."""
    verdict, note = judge(paired(S, a, b, key), margin)
    return verdict, f"{a} {fmt([s[key] for s in S[a]])} vs {b} {fmt([s[key] for s in S[b]])} (Δ {note})"


def beats(S, a, b, key="mean") -> tuple:
    """"a beats b": a - b > TOL. Holds when the 95 % interval of the paired difference lies above
    +TOL; contradicted when it lies below +TOL, i.e. a win of TOL or more is ruled out (a may be
    worse, equal, or better by less than TOL, which counts as noise here). The line between the
    two is +TOL for both, not 0 for contradicted: with enough seeds every true difference other
    than TOL then gets a verdict, where a line at 0 would leave a true gain under TOL
    inconclusive at any number of seeds."""
    return versus(S, a, b, TOL, key)


def at_least(S, a, b, key="mean") -> tuple:
    """"a at least b" (non-inferiority): a - b > -TOL. Holds when the 95 % interval lies above
    -TOL, contradicted when it lies below -TOL (a is worse by more than TOL), else inconclusive."""
    return versus(S, a, b, -TOL, key)


def all_of(verdicts) -> str:
    """A claim made of parts: contradicted if one part is, holds if all hold, else inconclusive."""
    verdicts = list(verdicts)
    return "contradicted" if "contradicted" in verdicts else \
        "holds" if all(v == "holds" for v in verdicts) else "inconclusive"


def negate(verdict: str) -> str:
    return {"holds": "contradicted", "contradicted": "holds"}.get(verdict, verdict)


MIXTURES = ("MoLoRA soft", "MoLoRA top-2", "MALoRA", "MoSLD p=0.1", "MoDULA-Flan", "MoDULA-Res", "MoA-style")
ADDED = (f"MoDULA-Res, {NEW} added later", f"MoA-style, {NEW} added later")


def avg(S, row, key):
    return statistics.mean(s[key] for s in S[row])


def recovers(S) -> tuple:
    """Every mixture method beats the single LoRA on the mixture."""
    rows = [r for r in MIXTURES if r in S] or [MIXTURES[0]]        # none ran: KeyError -> not run
    parts = [(r, *judge(paired(S, r, MIX), TOL)) for r in rows]
    return all_of(v for _, v, _ in parts), f"Δ over {MIX}: " + "; ".join(f"{r} ({n})" for r, _, n in parts)


def shared_a(S) -> tuple:
    """MoSL (one A, p = 0) against the same experts with their own A, and the parameter ratio."""
    v, text = at_least(S, "MoSL p=0", OWN_A)
    return v, f"{text}; {avg(S, 'MoSL p=0', 'params') / avg(S, OWN_A, 'params'):.0%} of the parameters"


def step_time(S) -> tuple:
    """MALoRA's step time over the parameter-matched MoLoRA's, from tokens/s paired by seed: holds
    when the ratio's 95 % interval lies below 1."""
    v, note = judge(paired(S, MATCHED, "MALoRA", "tps", lambda x, y: x / y), 1, below=True, spec=".2f")
    return v, f"MALoRA step / MoLoRA's (whole CPU train step): {note}"


def pluggable(S) -> tuple:
    """Adding a domain keeps old tasks within 2 points (each seed's largest drop, over the old
    domains and the general task, from before the new domain to after it), touches <= 25 % of the
    parameters of the MoLoRA soft that was run, and learns the new domain at least as well as that
    MoLoRA did on everything. "Before" is the adapter the add run starts from; "after" has had a
    second router stage that "before" did not, and no control given the same extra router steps
    was run, so a gain on old tasks (a negative drop) may be those steps' work, not the method's."""
    retrain = {s["seed"]: s["params"] for s in S["MoLoRA soft"]}       # the MoLoRA that was run
    parts, texts = [], []
    for r in [r for r in ADDED if r in S] or [ADDED[0]]:
        drops = [100 * s["add_domain"]["max_old_task_drop"] for s in S[r]]
        touched = {s["seed"]: s["add_domain"]["params_touched"] for s in S[r] if s["seed"] in retrain}
        shares = [100 * touched[k] / retrain[k] for k in touched]
        (v1, n1), (v2, n2) = judge(drops, 2, below=True), judge(shares, 25, below=True, spec=".1f")
        v3, n3 = judge(paired(S, r, "MoLoRA soft", "new"), -TOL)          # at least MoLoRA soft
        parts += [v1, v2, v3]
        texts.append(f"{r}: largest old-task drop per seed {', '.join(f'{x:+.1f}' for x in drops)} pts "
                     f"(mean {n1}); touched {statistics.mean(touched.values()):,.0f} of the "
                     f"{statistics.mean(retrain.values()):,.0f} parameters of MoLoRA soft (share %: {n2}); {NEW} "
                     f"{fmt([s['new'] for s in S[r]])} vs MoLoRA soft on everything "
                     f"{fmt([s['new'] for s in S['MoLoRA soft']])} (Δ {n3})")
    return all_of(parts), "; ".join(texts) + (". \"After\" had a second router stage that \"before\" did "
                                              "not; no control with the same extra router steps was run, so "
                                              "an old-task gain may be those steps' work")


def overfits(S) -> tuple:
    """Check 5: MoLoRA's mean accuracy falls from the peak of its rank sweep to the largest rank
    (a paired fall of more than TOL, judged as "peak beats largest"), and MALoRA's peaks at a
    higher rank or does not fall (that fall contradicted)."""
    peak, falls, texts = {}, {}, []
    for label in SWEEP:
        rows = [(r, sweep_row(label, r)) for r in SWEEP_RANKS if sweep_row(label, r) in S]
        if len(rows) < 2:
            raise KeyError(f"the rank sweep of {label}")
        peak[label], top = max(rows, key=lambda rr: avg(S, rr[1], "mean"))
        falls[label], note = judge(paired(S, top, rows[-1][1]), TOL)
        accs = "/".join(f"{avg(S, row, 'mean'):.1f}" for _, row in rows)
        texts.append(f"{label} r={'/'.join(str(r) for r, _ in rows)}: {accs} (peak r={peak[label]}; "
                     f"peak - r={rows[-1][0]}: {note})")
    molora, malora = SWEEP
    later = "holds" if peak[molora] < peak[malora] else negate(falls[malora])
    return all_of([falls[molora], later]), "; ".join(texts)


def keeps_general(S) -> tuple:
    """MoDULA-Res's general-task accuracy minus the base's, per seed, is above -2 points."""
    v, note = judge([s["general"] - s["base_general"] for s in S["MoDULA-Res"]], -2)
    return v, f"{tasks.GENERAL}: base {avg(S, 'MoDULA-Res', 'base_general'):.1f}, MoDULA-Res " \
              f"{avg(S, 'MoDULA-Res', 'general'):.1f} (Δ {note})"


CHECKS = [  # (check number, claim, the paper's numbers, verdict function)
    ("1", "Interference: one LoRA on the mixture is below one LoRA per task",
     "MALoRA T1: 54.7 mixture vs 57.0 single-task; MoSLD T3: 52.47 vs 53.58",
     lambda S: beats(S, PER_TASK, MIX)),
    ("1", "Every mixture method recovers part of the gap (beats the mixture LoRA)",
     "MoSLD T3: MoSLD 53.93 vs LoRA 52.47; MALoRA T1: MoLoRA 55.3, MALoRA 56.3 vs LoRA 54.7", recovers),
    ("2", "Soft routing >= top-2 (MoLoRA, same E and r; top-1 not run)",
     "MoV-10: soft 59.93, top-2 57.45, top-1 54.92 [unverified]",
     lambda S: at_least(S, "MoLoRA soft", "MoLoRA top-2")),
    ("3", "A shared A loses nothing, at ~60% of the parameters (MoSL vs per-expert A)",
     "MoSLD T1/T5: MoSL 70.88 vs MoLA 70.00 at 62% of the parameters", shared_a),
    ("3", "MALoRA >= MoLoRA at matched parameters", "MALoRA T1: 56.3 vs 55.3 (158.9M vs 151.2M parameters)",
     lambda S: at_least(S, "MALoRA", MATCHED)),
    ("3", "Dropout on A beats dropout on B (MoSLD)", "MoSLD T2: 71.56 vs 70.73 (mixture)",
     lambda S: beats(S, "MoSLD p=0.1", "MoSLD dropout on B")),
    ("4", "DropConnect on A: p=0.1 beats p=0", "MoSLD T1: 71.56 vs 70.88 (mixture)",
     lambda S: beats(S, "MoSLD p=0.1", "MoSL p=0")),
    ("4", "DropConnect on A: p=0.3 is visibly worse than p=0.1",
     "MoSLD Fig. 5: accuracy mostly falls as p rises",
     lambda S: beats(S, "MoSLD p=0.1", "MoSLD p=0.3")),
    ("5", "Raising the rank overfits MoLoRA sooner than MALoRA",
     "MALoRA T11: MoLoRA r=4/8/16/32 53.12/55.33/56.19/55.74; MALoRA 54.28/56.27/56.61/56.69", overfits),
    ("6", "MALoRA's step is faster than MoLoRA's (x S_A computed once)",
     "MALoRA T10: 14.69 s vs 17.57 s, 0.84x", step_time),
    ("7", f"Adding a domain ({NEW}) keeps old tasks, touches <= 25% of the MoLoRA run here, matches it on {NEW}",
     "MoDULA: 19.8% of the parameters; T4 FinGPT Res 80.61 vs MoLoRA 75.41 (Qwen-7B)", pluggable),
    ("8", "Residual: MoDULA-Res >= MoDULA-Flan", "MoDULA T1: Res 51.36 vs Flan 50.32 (Qwen-7B)",
     lambda S: at_least(S, "MoDULA-Res", "MoDULA-Flan")),
    ("8", f"MoDULA-Res keeps the general task ({tasks.GENERAL}) within 2 points of the base",
     "MoDULA T3: LLaMA-2-7B MMLU base 45.91, Res 48.23", keeps_general),
]


def verdicts(S: dict) -> list:
    """(check, claim, verdict, ours, paper) per CHECKS entry; 'not run' where its runs are missing."""
    out = []
    for n, claim, paper, fn in CHECKS:
        try:
            verdict, ours = fn(S)
        except KeyError as e:
            verdict, ours = "not run", f"missing runs: {e}"
        out.append((n, claim, verdict, ours, paper))
    return out


# ----------------------------------------------------------------------------- report


VERDICT_RULE = f"""How a verdict is reached: from the 95 % confidence interval of the per-seed difference,
paired by seed (Student t with n - 1 degrees of freedom, n the seeds that have both rows), against a
margin of {TOL:g} point, the size under which a difference counts as noise. "a beats b" holds if
the whole interval lies above +{TOL:g} (a wins by more than {TOL:g} point) and is contradicted if it
lies below +{TOL:g} (a win of {TOL:g} point or more is ruled out: a is worse, equal, or better by
less; one line for both outcomes, so that with enough seeds every true difference but +{TOL:g} gets a
verdict); "a >= b" (no worse) holds above -{TOL:g} and is contradicted below -{TOL:g}; a limit (an old-task
drop <= 2 points, a share <= 25 %, a step-time ratio < 1) is judged the same way on the per-seed
values. Where the interval straddles the line, the verdict is inconclusive. A claim of several parts
holds if all hold and is contradicted if one is. With fewer than {MIN_SEEDS} seeds every verdict is
inconclusive whatever its interval ("ours" gives what the interval alone says)."""


def report(S: dict, rows: list, checks: list, head: list, notes: list) -> str:
    """RESULTS.md: the budget, the comparison table (mean ± std over seeds), the verdicts."""
    cols = [*tasks.TASKS, "mean", "per-digit mean", f"{tasks.GENERAL} (general)"]
    opt = lambda ss, k: "—" if ss[0][k] is None else f"{ss[0][k]:,}"            # noqa: E731
    out = [*head, "", "## Comparison (exact-match accuracy %, mean ± std over seeds)", "",
           "Optimiser steps and tokens are those of one seed, summed over every run and stage of the "
           "row (tokens — : not recorded by the train.py that ran it).", "",
           f"| method | trainable params | {' | '.join(cols)} | optimiser steps | tokens | tokens/s | wall s |",
           "|---" * (len(cols) + 6) + "|"]
    for row in (r for r in rows if r in S):
        ss = S[row]
        accs = [fmt([s["acc"][t] for s in ss]) for t in tasks.TASKS]
        digits = "—" if ss[0]["digit_mean"] is None else fmt([s["digit_mean"] for s in ss])
        out.append(f"| {row} | {ss[0]['params']:,} | {' | '.join(accs)} | {fmt([s['mean'] for s in ss])} | "
                   f"{digits} | {fmt([s['general'] for s in ss])} | {opt(ss, 'opt_steps')} | "
                   f"{opt(ss, 'tokens')} | {fmt([s['tps'] for s in ss], 0)} | {fmt([s['wall'] for s in ss], 0)} |")
    if any(sweep_row(label, r) in S for label in SWEEP for r in SWEEP_RANKS):
        out += ["", "## Rank sweep (check 5): mean task accuracy %, trainable parameters", "",
                f"| method | {' | '.join(f'rank {r}' for r in SWEEP_RANKS)} |", "|---" * (len(SWEEP_RANKS) + 1) + "|"]
        for label in SWEEP:
            cells = [f"{fmt([s['mean'] for s in S[row]])} ({S[row][0]['params']:,})" if row in S else "not run"
                     for row in (sweep_row(label, r) for r in SWEEP_RANKS)]
            out.append(f"| {label} | {' | '.join(cells)} |")
    staged = [r for r in rows if r in S and S[r][0]["own_expert"] is not None]
    if staged:
        out += ["", "## Staged methods: routed, and each task through its own expert alone", "",
                "The second column is the experts' quality apart from the router's (oracle routing: "
                "task t through expert t only); the gap between the columns is the router's.", "",
                "| method | routed, mean | own expert alone, mean |", "|---|---|---|"]
        out += [f"| {r} | {fmt([s['mean'] for s in S[r]])} | {fmt([s['own_expert'] for s in S[r]])} |"
                for r in staged]
    out += ["", "## Qualitative checks (the papers' claims, on these tasks)", "",
            VERDICT_RULE.replace("\n", " "), "", "| § | claim | here | ours | paper |", "|---|---|---|---|---|"]
    out += [f"| {n} | {claim} | **{v}** | {ours} | {paper} |" for n, claim, v, ours, paper in checks]
    return "\n".join(out + ["", "## Notes", "", *[f"- {n}" for n in notes or ["none"]], ""])


def plot(S: dict, rows: list, out_dir: str) -> str:
    """accuracy.png: mean accuracy against trainable parameters, and accuracy per task per row; a
    note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install matplotlib)"
    rows, names = [r for r in rows if r in S], [*tasks.TASKS, "mean", tasks.GENERAL]
    color = lambda i: plt.cm.tab20(i % 20)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 2]})
    for i, r in enumerate(rows):
        m, s = mean_std(x["mean"] for x in S[r])
        ax1.errorbar(S[r][0]["params"], m, yerr=s, fmt="os^vD"[i % 5], color=color(i), capsize=3)
        vals = [statistics.mean(x["general"] if t == tasks.GENERAL else x["mean"] if t == "mean"
                                else x["acc"][t] for x in S[r]) for t in names]
        ax2.bar([j + i * 0.8 / len(rows) for j in range(len(names))], vals, 0.8 / len(rows),
                color=color(i), label=r)
    ax1.set(xscale="log", xlabel="trainable parameters", ylabel="mean task accuracy (%)",
            title="accuracy vs trainable parameters (± std over seeds)")
    ax2.set_xticks([j + 0.4 for j in range(len(names))], [*names[:-1], f"{tasks.GENERAL} (general)"])
    ax2.set(ylabel="accuracy (%)", title="accuracy per task")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)
    return "plot: [accuracy vs trainable parameters, and per task](accuracy.png)"


def head_lines(budget: dict, records: list, base: str, how: str, then: str) -> list:
    """RESULTS.md's title and budget paragraph: `how` the runs came about, `then` what followed."""
    b = budget
    title = "every method under one budget" + " (QUICK RUN: a smoke test, not the comparison)" * b["quick"]
    return [f"# Results: {title}", "",
            f"{how}: {b['steps']} steps at lr {b['lr']}, per-expert rank {b['rank'] or 'as each method default'}, "
            f"{b['seeds']} seed(s), {b['eval_examples']} held-out examples per task, base {base} (shared); "
            f"{b['jobs']} train.py process(es) at once, one thread each; the runs' wall times sum to "
            f"{sum(r['wall_seconds'] for r in records) / 60:.1f} min. {then}",
            *["", BUDGET_NOTE.replace("\n", " ")] * (b["rank"] == 2)]


def plot_usage(records: list, out_dir: str) -> str:
    """usage-<run>.png for every routed run (seed 0): train.py's expert_usage as heatmaps, tasks x
    experts, one panel per adapted layer (rows: blocks, columns: linears), one colour scale (the
    share of a task's gate mass, 0 to 1); a note instead when matplotlib is missing."""
    routed = [r for r in records if r.get("expert_usage") and r["seed"] == 0]
    if not routed:
        return "expert-usage heatmaps: no routed run"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "expert-usage heatmaps skipped: matplotlib is not installed (pip install matplotlib)"
    for r in routed:
        usage = r["expert_usage"]
        split = lambda name: (name.rsplit(".", 1)[0].split(".")[1], name.rsplit(".", 1)[1])   # block, linear
        blocks = list(dict.fromkeys(split(n)[0] for n in usage))
        linears = list(dict.fromkeys(split(n)[1] for n in usage))
        fig, axes = plt.subplots(len(blocks), len(linears), squeeze=False,
                                 figsize=(1.6 * len(linears) + 1.5, 1.5 * len(blocks) + 1))
        for name, per_task in usage.items():
            b, lin = split(name)
            ax = axes[blocks.index(b)][linears.index(lin)]
            grid = [per_task[t] for t in per_task]                        # tasks x experts
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            E = len(grid[0])
            experts = r.get("expert_names") or [str(e) for e in range(E)]
            bottom, left = b == blocks[-1], lin == linears[0]                # labels on the edges
            ax.set_xticks(range(E), [e[:5] for e in experts] if bottom else [], fontsize=6, rotation=90)
            ax.set_yticks(range(len(per_task)), list(per_task) if left else [], fontsize=6)
            ax.set_title(f"block {b} {lin}", fontsize=7)
        fig.suptitle(f"{r['row']}: mean gate of each expert (columns) on each task's tokens (rows)",
                     fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.6, label="share of the task's gate mass")
        fig.savefig(os.path.join(out_dir, f"usage-{r['run']}.png"), dpi=110)
        plt.close(fig)
    return "expert usage: " + ", ".join(f"[{r['row']}](usage-{r['run']}.png)" for r in routed)


def publish(S: dict, runs: list, out_dir: str, head: list, notes: list, records=()) -> list:
    """The plots and RESULTS.md into out_dir; returns the notes with the plots' lines."""
    rows = list(dict.fromkeys(r.row for r in runs if r.table))
    os.makedirs(out_dir, exist_ok=True)
    notes = [*notes, plot(S, rows, out_dir), plot_usage(list(records), out_dir)]
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(report(S, rows, verdicts(S), head, notes))
    return notes


def rejudge(path: str) -> None:
    """--report: RESULTS.md and the plot again, next to results.json, from the runs it records
    (nothing is trained), with this file's tables and verdict rule."""
    with open(path) as f:
        data = json.load(f)
    b, records = data["budget"], data["runs"]
    if not records:
        sys.exit(f"compare.py: {path} records no runs")
    cmd = records[0]["command"]
    head = head_lines(b, records, cmd[cmd.index("--init-from") + 1], f"The runs recorded in {path}",
                      f"Verdicts re-judged from these same runs, without training, by `python compare.py "
                      f"--report {path}` with the rule stated above the checks.")
    notes = [n for n in data["notes"] if not n.startswith(("plot", "expert"))]   # redone below
    publish(summarize(records), run_table(b["rank"], matched_molora_rank(b["rank"])),
            os.path.dirname(os.path.abspath(path)), head, notes, records)
    print(f"wrote {os.path.join(os.path.dirname(path), 'RESULTS.md')} from {path} ({len(records)} runs)")


# ----------------------------------------------------------------------------- main
if __name__ == "__main__":
    a = p.parse_args()
    if a.report:
        rejudge(a.report)
        sys.exit(0)
    quick = a.quick
    a.steps = a.steps or (100 if quick else 300)
    a.seeds = a.seeds or (1 if quick else MIN_SEEDS)
    a.eval_examples = a.eval_examples or (100 if quick else 300)
    a.out = a.out or ("results/quick" if quick else "results")
    for flag in ("steps", "seeds", "eval_examples", "jobs"):
        if getattr(a, flag) < 1:
            sys.exit(f"compare.py: --{flag.replace('_', '-')} {getattr(a, flag)}: must be >= 1")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    runs, notes = run_table(a.rank, matched_molora_rank(a.rank)), []
    run_dir = lambda name, seed: os.path.join(a.out, "runs", name, f"seed{seed}")

    # the shared base model: pretrained once (or reused from out/base), then --init-from for all
    base_cmd = ["train.py", "--method", "lora", "--steps", "0", "--eval-examples", "1", "--seed", "0",
                "--pretrain-steps", str(a.pretrain_steps), "--out", os.path.join(a.out, "runs", "base")]
    base_dir = os.path.join(ROOT, a.out, "runs", "base")
    from common import adapter_meta
    if not finished(base_dir, base_cmd) or not os.path.exists(
            os.path.join(ROOT, adapter_meta(os.path.join(base_dir, "adapter.safetensors"))["base"])):
        print("compare.py: pretraining (or finding) the base model ...", file=sys.stderr)
        if why := execute(base_cmd, base_dir):
            sys.exit(f"compare.py: the base model run failed ({why}); see {base_dir}/train.log")
    base = adapter_meta(os.path.join(base_dir, "adapter.safetensors"))["base"]

    def command(run, seed):
        steps = max(1, round(run.steps_frac * a.steps))
        cmd = ["train.py", *run.args, "--steps", str(steps), "--lr", str(a.lr), "--seed", str(seed), "--eval-examples",
               str(a.eval_examples), "--init-from", base, "--out", run_dir(run.name, seed)]
        return cmd + (["--init-adapter", os.path.join(run_dir(run.after, seed), "adapter.safetensors")]
                      if run.after else [])

    failed, ran = {}, []                                   # ran: the runs this invocation trained
    bar = tqdm(total=len(runs) * a.seeds, desc="compare", dynamic_ncols=True)

    def work(job):
        run, seed = job
        if (run.after, seed) in failed:
            failed[run.name, seed] = f"needs {run.after}, which failed"
        elif not finished(os.path.join(ROOT, run_dir(run.name, seed)), command(run, seed)):
            bar.set_postfix_str(f"{run.name} seed {seed}")
            ran.append(job)
            if why := execute(command(run, seed), os.path.join(ROOT, run_dir(run.name, seed))):
                failed[run.name, seed] = why
        bar.update()

    jobs = [(r, s) for s in range(a.seeds) for r in runs]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(work, [j for j in jobs if not j[0].after]))
        list(pool.map(work, [j for j in jobs if j[0].after]))          # they start from the first ones
    bar.close()
    notes += [f"{name} seed {seed}: FAILED, {why}" for (name, seed), why in failed.items()]

    records = []
    for run, seed in jobs:
        d = os.path.join(ROOT, run_dir(run.name, seed))
        if (run.name, seed) not in failed:
            with open(os.path.join(d, "metrics.json")) as f, open(os.path.join(d, "run.json")) as g:
                records.append({"run": run.name, "row": run.row, "task": run.task,
                                **json.load(g), **json.load(f)})
    wall = time.perf_counter() - t_start
    head = head_lines(vars(a), records, base, f"`python compare.py {' '.join(sys.argv[1:])}`",
                      f"This invocation trained {len(ran)} of the {len(jobs)} runs (the others were finished "
                      f"already) in {wall / 60:.1f} min (load average {load_start[0]:.1f} at the start, "
                      f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs).")
    notes = publish(summarize(records), runs, os.path.join(ROOT, a.out), head, notes, records)
    with open(os.path.join(ROOT, a.out, "results.json"), "w") as f:
        json.dump({"budget": vars(a), "runs": records, "notes": notes}, f, indent=1)
    print(f"wrote {a.out}/RESULTS.md and results.json ({len(records)} runs, {wall / 60:.1f} min)")
    sys.exit(1 if failed else 0)
