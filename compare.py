"""Compare every method under one budget: same base model, data, steps and seeds.

    python compare.py --quick        # 1 seed, short runs: the whole pipeline, a smoke test
    python compare.py                # 5 seeds, the full budget; then read results/RESULTS.md
    python compare.py --collect      # RESULTS.md from the runs finished so far (no training)
    python compare.py --report results/results.json   # RESULTS.md again from recorded runs, no training

Every run is `python train.py ...` in a subprocess, exactly what a user gets, writing into
<out>/runs/<run>/seed<k>/ (train.log, metrics.json, adapter). A run whose metrics.json is there and
whose run.json holds the same command is skipped, so an interrupted comparison resumes. With
--reuse, so is a run that <out>/results.json already records with the same command (its record is
taken as it is), so that a change to one configuration reruns only that configuration's runs, also
from a fresh clone; the key is the command alone, so --reuse is for changes to compare.py's plan,
not to the code that trains.

The runs, in blocks (run_table):
- main: every method on the "maps" tasks (conflicting digit maps, fresh data each step), the
  per-task LoRA references (each as many optimiser steps on its task as a joint run takes in all),
  LoRA and MoLoRA at the parameters of the methods they are compared with, MoSLD's paper setting
  (q/v) as side rows, and a domain added later to MoDULA-Res and MoA with its control (the same
  extra router stage, no new domain);
- sizes: each method at three or more sizes on the same linears (accuracy against parameters);
- finite: a fixed training set per task, seen for several epochs, where regularisation
  (DropConnect) and overfitting (the rank sweep) can show;
- shared: the "shared" tasks, where every task needs one skill the base lacks, so a shared part
  has something to share.
Before them, each configuration's peak lr is chosen from LR_GRID on the validation split (one
seed outside the evaluation seeds); every row of that configuration trains at it. Each rank of the
rank sweep is a configuration of its own (SWEEP_LR_GRID, on its finite training set).

Writes <out>/results.json (every run), <out>/RESULTS.md (mean ± std over seeds; a verdict for each
claim of the papers beside the paper's numbers) and, with matplotlib, the figures of figures.py.
A verdict is holds, contradicted or inconclusive, from the paired 95 % interval of the per-seed
difference (`judge`, `beats`, `at_least`); it needs at least MIN_SEEDS seeds. The headline mean
counts the tasks that the per-task reference learns (LEARNED); the others are reported apart.

Budget: every run gets the same --steps (a staged method runs each stage for the share of it that
its config's stage_steps sets) and the same per-expert --rank, with alpha = 2 rank, so that every
scaling alpha / r stays at the methods' default 2. All runs start from one base model, pretrained
once (seed 0).
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
from figures import mean_std

ROOT = os.path.dirname(os.path.abspath(__file__))
NEW = tasks.TASKS[-2]          # the domain that the add-a-domain runs learn last (one the references learn)
D_MODEL = 128                  # train.py's default --n-embd, for matching MoLoRA's parameters to MALoRA's
TOL = 1.0                      # accuracy points: a difference smaller than this is noise (verdicts)
MIN_SEEDS = 5                  # fewer seeds with both rows: every verdict is inconclusive
SIZE_SEEDS = 3                 # seeds of a size row that no verdict uses (accuracy against parameters)
LEARNED = 95.0                 # a task counts in the headline mean if its per-task reference reaches this
LR_GRID = (3e-3, 1e-2)         # every method's peak lr is chosen from these, on the validation split
                               # (1e-3, train.py's default, leaves rank-2 runs near 0 % in 300 steps)
SWEEP_LR_GRID = (1e-3, 3e-3, 1e-2)   # the rank sweep's: up to 8x the parameters of rank 2 need a lower lr
GRID_COLUMNS = tuple(sorted({*LR_GRID, *SWEEP_LR_GRID}))     # the lr table's columns
TRAIN_EXAMPLES = 1000          # the finite-data block: fixed training examples per task
SWEEP_RANKS = (1, 4, 16)       # check 5: per-expert ranks of the MoLoRA / MALoRA rank sweep (finite data)
SWEEP = ("MoLoRA top-2", "MALoRA")
SWEEP_CONFIGS = (("molora-top2", "molora", ("--variant", "top2")), ("malora", "malora", ()))  # key, method, args
ALL_LINEARS = ("--cfg", 'targets=["q","k","v","o","up","down"]')
# MoDULA's router stage here: 600 steps (twice stage 2's, not once) at 10/3 of the chosen lr (1e-2 at
# 3e-3), the default run's router stage; at once stage 2's steps and 10x the lr its routers, trained
# by the LM loss alone, had not found their experts (docs/comparison.md). The config's own
# proportions stay as side rows, at the lr chosen for this setting.
MODULA_ROUTER = ("--cfg", "stage_steps=[0.25,1.0,2.0]", "--cfg", "router_lr_scale=3.3333")
QV = ("--cfg", 'targets=["q","v"]')
MIX, PER_TASK, MATCHED = "LoRA, mixture", "LoRA, one per task", "MoLoRA top-2, parameters matched to MALoRA"
LORA_MATCHED = "LoRA, parameters matched to MoLoRA top-2"
OWN_A = "MoLoRA top-2, q/v, E=5 (own A per expert)"     # MoSLD's experts without the shared A ("MoLA")
FINITE = f" ({TRAIN_EXAMPLES} examples per task)"        # the finite-data block's rows end with this
SHARED = " [shared family]"                              # the shared-skill family's rows end with this
SHORT_ROUTER = ", router stage as long as stage 2, at 10x lr"   # MoDULA's side rows without MODULA_ROUTER
BUDGET_NOTE = """Why rank 2 per expert, not the methods' own 8: on these tasks one rank-8 LoRA learns
every digit map of the mixture in 300 steps, so nothing interferes and all methods tie at the
ceiling. At rank 2 one LoRA no longer holds the maps of all tasks, while a rank-2 LoRA per task
still learns its own: the interference the mixture methods are meant to remove (check 1). MoSLD
runs at its own rank 8 (its shared A has rank r, so at r = 2 every expert would read one
2-dimensional projection of x), on the same six linears as the others; its paper setting (q/v) is a
side row."""
# ----------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true",
               help="smoke budget: 1 seed, 50 steps, 50 eval examples, one lr, no size rows, output in "
                    "results/quick")
p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 300; quick 50)")
p.add_argument("--seeds", type=int, default=None,
               help=f"seeds per run (default {MIN_SEEDS}, the fewest a verdict needs; quick 1)")
p.add_argument("--eval-examples", type=int, default=None,
               help="held-out examples per task (default 300; quick 50)")
p.add_argument("--rank", type=int, default=2,
               help="per-expert rank of every method (MALoRA: the MoLoRA rank it replaces; MoDULA: the "
                    "domain rank, universal 2x); 0 keeps each method's defaults")
p.add_argument("--pretrain-steps", type=int, default=1500, help="pretraining steps of the shared base model")
p.add_argument("--jobs", type=int, default=2, help="train.py processes at once, one thread each")
p.add_argument("--out", default=None, help="output folder (default results; quick: results/quick)")
p.add_argument("--collect", action="store_true",
               help="train nothing: RESULTS.md and results.json from the runs already finished under --out "
                    "(and, with --reuse, recorded there; the others are listed as not run yet); a later call "
                    "without it resumes")
p.add_argument("--reuse", action="store_true",
               help="take a run that <out>/results.json records with the same command as finished (its "
                    "record as it is): after a change to this file's plan, only the changed runs train. The "
                    "command is the whole key: do not use it after a change to the code that trains")
p.add_argument("--report", metavar="RESULTS_JSON", default=None,
               help="train nothing: rebuild RESULTS.md (and the plot) beside this results.json from the "
                    "runs it records, with this compare.py's tables and verdicts")


@dataclass
class Run:
    name: str                  # folder and key in results.json
    row: str                   # its row of the comparison table (the per-task LoRAs share one)
    args: tuple                # train.py arguments, --method first
    lr: str                    # whose chosen learning rate it trains at (a key of tune_table)
    block: str = "main"        # its table: main, sizes, finite, shared, tune (lr choice), add (first halves)
    curve: str | None = None   # the method whose accuracy-against-parameters line it is a point of
    seeds: int | None = None   # at most this many seeds (None: all; a row no verdict uses needs fewer)
    after: str | None = None   # the run whose adapter this one starts from (--init-adapter)
    task: str | None = None    # a one-task run: the task its row takes from it


def budget_cfg(method: str, r: int) -> tuple:
    """--cfg arguments that set `method` to per-expert rank r with alpha / rank = 2; r = 0: none.
    MoSLD's r is its shared A's rank, of every B_e too."""
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


def sweep_key(key: str, k: int) -> str:
    """The tune key of a rank-sweep configuration: its own lr, chosen on its own finite data."""
    return f"{key}-r{k}-finite"


def lr_grid(key: str) -> tuple:
    """The lrs a configuration's tune runs try."""
    sweep = {sweep_key(k, r) for k, _, _ in SWEEP_CONFIGS for r in SWEEP_RANKS}
    return SWEEP_LR_GRID if key in sweep else LR_GRID


def tune_table(r: int) -> dict:
    """The configurations whose peak lr is chosen on the validation split: key -> train.py args."""
    def m(method, *extra):
        return ("--method", method, *budget_cfg(method, r), *extra)
    return {"lora": m("lora"), "lora-matched": ("--method", "lora", *budget_cfg("lora", 8 * r)),
            "molora-soft": m("molora", "--variant", "soft"),
            "molora-top2": m("molora", "--variant", "top2"), "malora": m("malora"),
            "mosld": ("--method", "mosld", *budget_cfg("mosld", 4 * r), *ALL_LINEARS),
            "modula-flan": m("modula", "--variant", "flan", *MODULA_ROUTER),
            "modula-res": m("modula", "--variant", "res", *MODULA_ROUTER),
            "moa": m("moa"),
            **{sweep_key(key, k): ("--method", method, *budget_cfg(method, k), *variant,
                                   "--train-examples", str(TRAIN_EXAMPLES))
               for key, method, variant in SWEEP_CONFIGS for k in SWEEP_RANKS}}


def size_ranks(r: int) -> dict:
    """Curve -> (tune key, method, extra args, per-expert ranks): at least three sizes per method on
    its main row's linears, the main row's rank among them; LoRA up to the rank whose parameters
    match MoLoRA top-2 (8 r: E = 8 experts of rank r)."""
    half = max(1, r // 2)
    return {"LoRA": ("lora", "lora", (), (half, r, 4 * r, 8 * r)),
            "MoLoRA top-2": ("molora-top2", "molora", ("--variant", "top2"), (half, r, 2 * r)),
            "MALoRA": ("malora", "malora", (), (half, r, 2 * r)),
            "MoSLD": ("mosld", "mosld", ALL_LINEARS, (2 * r, 4 * r, 8 * r)),
            "MoDULA-Res": ("modula-res", "modula", ("--variant", "res", *MODULA_ROUTER), (half, r, 2 * r)),
            "MoA-style": ("moa", "moa", (), (half, r, 2 * r))}


def size_row(curve: str, rank: int) -> str:
    return f"{curve}, rank {rank}"


MAIN_SIZE = {"LoRA": MIX, "MoLoRA top-2": "MoLoRA top-2", "MALoRA": "MALoRA", "MoSLD": "MoSLD p=0.1",
             "MoDULA-Res": "MoDULA-Res", "MoA-style": "MoA-style"}      # curve -> its main row


def curves(r: int) -> dict:
    """Curve -> its rows in increasing size: the size rows and the main row (and, for LoRA, the row
    matched to MoLoRA top-2) at their ranks."""
    out = {}
    for curve, (_, method, _, ranks) in size_ranks(r).items():
        main_rank = 4 * r if method == "mosld" else r
        out[curve] = [MAIN_SIZE[curve] if k == main_rank else LORA_MATCHED if method == "lora" and k == 8 * r
                      else size_row(curve, k) for k in ranks]
    return out


def run_table(r: int, matched: int) -> list:
    """Every run of the comparison, in order. matched: the MoLoRA rank that matches MALoRA."""
    tune = tune_table(r)
    only = lambda t, family: tuple(a for u in tasks.FAMILIES[family] if u != t for a in ("--exclude-task", u))
    main = [
        Run("lora", MIX, tune["lora"], "lora"),
        *[Run(f"lora-{t}", PER_TASK, tune["lora"] + only(t, "maps"), "lora", task=t)   # all the steps
          for t in tasks.TASKS],
        Run("molora-soft", "MoLoRA soft", tune["molora-soft"], "molora-soft"),
        Run("molora-top2", "MoLoRA top-2", tune["molora-top2"], "molora-top2"),
        Run("malora", "MALoRA", tune["malora"], "malora"),
        Run("molora-matched", MATCHED, ("--method", "molora", "--variant", "top2", "--cfg", f"rank={matched}",
            "--cfg", f"alpha={2 * matched}", "--cfg", 'targets=["q","k","v","up","down"]'), "molora-top2"),
        Run("lora-matched", LORA_MATCHED, tune["lora-matched"], "lora-matched"),
        Run("mosld", "MoSLD p=0.1", tune["mosld"], "mosld"),
        Run("mosld-qv", "MoSLD p=0.1, q/v (paper setting)",
            ("--method", "mosld", *budget_cfg("mosld", 4 * r), *QV), "mosld"),
        Run("mosl-qv", "MoSL p=0, q/v", ("--method", "mosld", "--variant", "mosl", *budget_cfg("mosld", 4 * r),
                                         *QV), "mosld"),
        Run("molora-qv", OWN_A, ("--method", "molora", "--variant", "top2", *budget_cfg("molora", 4 * r),
                                 *QV, "--cfg", "num_experts=5"), "molora-top2"),
        Run("modula-flan-router2x", "MoDULA-Flan", tune["modula-flan"], "modula-flan"),
        Run("modula-res-router2x", "MoDULA-Res", tune["modula-res"], "modula-res"),
        *[Run(f"modula-{v}", f"MoDULA-{v.capitalize()}{SHORT_ROUTER}",           # the config's proportions
              ("--method", "modula", *budget_cfg("modula", r), "--variant", v), f"modula-{v}") for v in ("flan", "res")],
        Run("moa", "MoA-style", tune["moa"], "moa"),
    ]
    add = []                   # a domain added later, and its control: the same router steps, no new domain
    for key, label in (("modula-res", "MoDULA-Res"), ("moa", "MoA-style")):
        add += [Run(f"{key}-minus", f"{label} without {NEW}", tune[key] + ("--exclude-task", NEW), key, "add"),
                Run(f"{key}-add", f"{label}, {NEW} added later", tune[key] + ("--add-domain", NEW), key,
                    after=f"{key}-minus"),
                Run(f"{key}-control", f"{label} without {NEW}, router stage again",
                    tune[key] + ("--exclude-task", NEW, "--router-only"), key, "add", after=f"{key}-minus")]
    sizes = [Run(f"size-{key}-r{k}", size_row(curve, k), (    # LoRA above rank r: the matched LoRA's lr
        "--method", method, *budget_cfg(method, k), *extra), "lora-matched" if key == "lora" and k > r else key,
        "sizes", curve, SIZE_SEEDS)
        for curve, (key, method, extra, ranks) in size_ranks(r).items() for k in ranks
        if k != (4 * r if method == "mosld" else r) and not (method == "lora" and k == 8 * r)]
    finite = [Run(f"finite-{name}", f"{label}{FINITE}", args + ("--train-examples", str(TRAIN_EXAMPLES)),
                  "mosld", "finite")
              for name, label, args in [
                  ("mosld-p0", "MoSL p=0", tune["mosld"] + ("--cfg", "drop_a=0.0")),
                  ("mosld", "MoSLD p=0.1", tune["mosld"]),
                  ("mosld-p0.3", "MoSLD p=0.3", tune["mosld"] + ("--cfg", "drop_a=0.3")),
                  ("mosld-drop-b", "MoSLD dropout on B", tune["mosld"] + ("--variant", "drop-b"))]]
    finite += [Run(f"finite-{method}-r{k}", f"{sweep_row(label, k)}{FINITE}", tune[sweep_key(key, k)],
                   sweep_key(key, k), "finite")
               for k in SWEEP_RANKS for (key, method, _), label in zip(SWEEP_CONFIGS, SWEEP)]
    fam = ("--family", "shared")
    shared = [Run("shared-lora", MIX + SHARED, tune["lora"] + fam, "lora", "shared"),
              *[Run(f"shared-lora-{t}", PER_TASK + SHARED, tune["lora"] + fam + only(t, "shared"), "lora",
                    "shared", task=t) for t in tasks.FAMILIES["shared"]],
              *[Run(f"shared-{key}", label + SHARED, tune[key] + fam, key, "shared") for key, label in
                zip(("molora-top2", "malora", "mosld", "modula-res"), SHARED_ROWS)]]
    return main + add + sizes + finite + shared


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


def recorded(path: str) -> dict:
    """(run, seed) -> its record in an earlier results.json (none: {}), for reuse when a run's
    command is the same."""
    try:
        with open(path) as f:
            return {(rec["run"], rec["seed"]): rec for rec in json.load(f)["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def reuse_plan(jobs: list, earlier: dict, command, on_disk, training: bool = True) -> set:
    """(run, seed) of the jobs to take from an earlier results.json (--reuse): recorded there with
    the same command and not finished in their own folder, except a parent of a run that will
    train (training=True), which needs the parent's adapter file, and a record has none. One level
    of parents, as run_table has. command(run, seed) and on_disk(run, seed) as in __main__."""
    same = {(r.name, s) for r, s in jobs
            if earlier.get((r.name, s), {}).get("command") == command(r, s) and not on_disk(r, s)}
    trains = {(r.name, s) for r, s in jobs if (r.name, s) not in same and not on_disk(r, s)}
    return same - {(r.after, s) for r, s in jobs if training and r.after and (r.name, s) in trains}


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


def fmt(values, digits=1) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def family_of(rec: dict) -> str:
    return rec.get("family") or "maps"


def summarize(records: list, headline: dict | None = None) -> dict:
    """row -> one dict per seed, in seed order: accuracy per task, mean (over the family's headline
    tasks, default all), per-digit mean and general (in %), trainable parameters, optimiser steps,
    tokens trained, tokens/s and wall seconds (summed over the runs of a row), add-a-domain report."""
    rows = {}
    for rec in records:
        rows.setdefault(rec["row"], {}).setdefault(rec["seed"], []).append(rec)
    out = {}
    for row, by_seed in rows.items():
        for seed, rs in sorted(by_seed.items()):
            family = tasks.FAMILIES[family_of(rs[0])]
            counted = (headline or {}).get(family_of(rs[0]), family)
            own = {r["task"]: r for r in rs if r["task"]}
            if own and set(own) != set(family):
                continue                                # a one-task run of this seed is missing
            acc = {t: 100 * own.get(t, rs[0])["per_task_accuracy"][t] for t in family}
            digit = [own.get(t, rs[0]).get("per_task_digit_accuracy", {}).get(t) for t in counted]
            out.setdefault(row, []).append({
                "digit_mean": None if None in digit else 100 * statistics.mean(digit),
                "opt_steps": sum(st["steps"] for r in rs for st in r["stages"]),     # every stage
                "tokens": sum(r.get("tokens_trained", 0) for r in rs) or None,
                "seed": seed, "acc": acc, "mean": statistics.mean(acc[t] for t in counted),
                "new": acc.get(NEW), "family": family_of(rs[0]),
                "general": 100 * statistics.mean(r["general_accuracy"] for r in rs),
                "base_general": 100 * rs[0]["base_accuracy"][tasks.GENERAL],
                "params": sum(r["trainable_params"] for r in rs),
                "tps": statistics.mean(r["tokens_per_second"] for r in rs),
                "wall": sum(r["wall_seconds"] for r in rs), "add_domain": rs[0].get("add_domain"),
                "epochs": rs[0].get("epochs"), "final_loss": rs[0]["stages"][-1].get("final_loss"),
                "own_expert": 100 * statistics.mean(v for t, v in rs[0]["oracle_routing_accuracy"].items()
                                                    if t in counted)
                if "oracle_routing_accuracy" in rs[0] else None})     # its own domains that the mean counts
    return out


def headline_tasks(records: list) -> dict:
    """family -> the tasks in its headline mean: those its per-task reference (mean over seeds)
    learns to at least LEARNED %; the others are reported apart. A family without references: all."""
    S, out = summarize(records), {}
    for family, names in tasks.FAMILIES.items():
        ref = next((row for row in S if row.startswith(PER_TASK) and S[row][0]["family"] == family), None)
        out[family] = tuple(t for t in names if ref is None or
                            statistics.mean(s["acc"][t] for s in S[ref]) >= LEARNED) or names
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
SHARED_ROWS = ("MoLoRA top-2", "MALoRA", "MoSLD p=0.1", "MoDULA-Res")     # the shared family's mixtures
ADDED = (f"MoDULA-Res, {NEW} added later", f"MoA-style, {NEW} added later")
CONTROL = {added: f"{added.split(',')[0]} without {NEW}, router stage again" for added in ADDED}


def avg(S, row, key):
    return statistics.mean(s[key] for s in S[row])


def recovers(S, suffix="", rows=MIXTURES) -> tuple:
    """Every mixture method beats the single LoRA on the mixture (rows of one family: `suffix`)."""
    rows = [r + suffix for r in rows if r + suffix in S] or [rows[0] + suffix]   # none ran: not run
    parts = [(r, *judge(paired(S, r, MIX + suffix), TOL)) for r in rows]
    return all_of(v for _, v, _ in parts), f"Δ over {MIX + suffix}: " + "; ".join(
        f"{r} ({n})" for r, _, n in parts)


def shared_a(S) -> tuple:
    """MoSL (one A, p = 0) against the same experts with their own A, and the parameter ratio."""
    v, text = at_least(S, "MoSL p=0, q/v", OWN_A)
    return v, f"{text}; {avg(S, 'MoSL p=0, q/v', 'params') / avg(S, OWN_A, 'params'):.0%} of the parameters"


def step_time(S) -> tuple:
    """MALoRA's step time over the parameter-matched MoLoRA's, from tokens/s paired by seed: holds
    when the ratio's 95 % interval lies below 1."""
    v, note = judge(paired(S, MATCHED, "MALoRA", "tps", lambda x, y: x / y), 1, below=True, spec=".2f")
    return v, f"MALoRA step / MoLoRA's (whole CPU train step): {note}"


def routing_not_capacity(S) -> tuple:
    """MoLoRA top-2 beats a single LoRA with as many trainable parameters: the gain is routing's."""
    v, text = beats(S, "MoLoRA top-2", LORA_MATCHED)
    return v, f"{text}; {avg(S, LORA_MATCHED, 'params'):,.0f} vs {avg(S, 'MoLoRA top-2', 'params'):,.0f} parameters"


def premise(S, row) -> tuple:
    """Where tasks share a skill, `row` gains more on MoLoRA top-2 than where they conflict: the
    per-seed difference of (row - MoLoRA top-2) between the shared family and the maps family."""
    def gain(suffix):                                  # seed -> row - MoLoRA top-2, in one family
        top2 = {t["seed"]: t["mean"] for t in S["MoLoRA top-2" + suffix]}
        return {s["seed"]: s["mean"] - top2[s["seed"]] for s in S[row + suffix] if s["seed"] in top2}
    shared, maps = gain(SHARED), gain("")
    d = [shared[k] - maps[k] for k in shared if k in maps]
    if not d:
        raise KeyError(f"no seed has {row} in both families")
    v, note = judge(d, TOL)
    return v, f"{row} - MoLoRA top-2: shared family {fmt(list(shared.values()))}, maps {fmt(list(maps.values()))} " \
              f"(difference {note})"


def shared_family(S) -> tuple:
    """Check 1 again on the shared-skill family: interference, then every mixture beats one LoRA."""
    (v1, t1), (v2, t2) = beats(S, PER_TASK + SHARED, MIX + SHARED), recovers(S, SHARED, SHARED_ROWS)
    return all_of([v1, v2]), f"{t1}; {t2}"


def pluggable(S) -> tuple:
    """Adding a domain keeps old tasks within 2 points of a control that had the same extra router
    stage without the new domain (each seed's largest drop, over the old domains and the general
    task), touches <= 25 % of the parameters of the MoLoRA soft that was run, and learns the new
    domain at least as well as that MoLoRA did on everything."""
    retrain = {s["seed"]: s["params"] for s in S["MoLoRA soft"]}       # the MoLoRA that was run
    parts, texts = [], []
    for r in [r for r in ADDED if r in S] or [ADDED[0]]:
        control = {s["seed"]: s for s in S[CONTROL[r]]}
        old = lambda s: [t for t in s["acc"] if t != NEW]
        drops = [max(max(control[s["seed"]]["acc"][t] - s["acc"][t] for t in old(s)),
                     control[s["seed"]]["general"] - s["general"]) for s in S[r] if s["seed"] in control]
        before = [100 * s["add_domain"]["max_old_task_drop"] for s in S[r]]
        touched = {s["seed"]: s["add_domain"]["params_touched"] for s in S[r] if s["seed"] in retrain}
        shares = [100 * touched[k] / retrain[k] for k in touched]
        (v1, n1), (v2, n2) = judge(drops, 2, below=True), judge(shares, 25, below=True, spec=".1f")
        v3, n3 = judge(paired(S, r, "MoLoRA soft", "new"), -TOL)          # at least MoLoRA soft
        parts += [v1, v2, v3]
        texts.append(f"{r}: largest old-task drop per seed against the control {', '.join(f'{x:+.1f}' for x in drops)} "
                     f"pts (mean {n1}; against the adapter before, without the extra router stage: "
                     f"{', '.join(f'{x:+.1f}' for x in before)}); touched {statistics.mean(touched.values()):,.0f} of the "
                     f"{statistics.mean(retrain.values()):,.0f} parameters of MoLoRA soft (share %: {n2}); {NEW} "
                     f"{fmt([s['new'] for s in S[r]])} vs MoLoRA soft on everything "
                     f"{fmt([s['new'] for s in S['MoLoRA soft']])} (Δ {n3})")
    return all_of(parts), "; ".join(texts)


def overfits(S) -> tuple:
    """Check 5, on the finite training set: MoLoRA's mean accuracy falls from the peak of its rank
    sweep to the largest rank (a paired fall of more than TOL, judged as "peak beats largest"),
    and MALoRA's peaks at a higher rank or does not fall (that fall contradicted). Overfitting fits
    the training set at least as well: where the largest rank's final training loss (the last
    logged batch's) is above the peak's, judged like a verdict on the per-seed differences, its
    fall may be a run that did not train, and that part of the check is inconclusive."""
    peak, falls, texts = {}, {}, []
    for label in SWEEP:
        rows = [(r, sweep_row(label, r) + FINITE) for r in SWEEP_RANKS if sweep_row(label, r) + FINITE in S]
        if len(rows) < 2:
            raise KeyError(f"the rank sweep of {label}")
        peak[label], top = max(rows, key=lambda rr: avg(S, rr[1], "mean"))
        falls[label], note = judge(paired(S, top, rows[-1][1]), TOL)
        loss = {row: [s.get("final_loss") for s in S[row]] for row in (top, rows[-1][1])}
        if falls[label] == "holds" and None not in loss[top] + loss[rows[-1][1]] and \
                judge(paired(S, rows[-1][1], top, "final_loss"), 0)[0] == "holds":
            falls[label] = "inconclusive"
            note += (f"; r={rows[-1][0]} fit its training set worse than the peak (final training loss "
                     f"{fmt(loss[rows[-1][1]], 3)} against {fmt(loss[top], 3)}), so its fall is no evidence of "
                     f"overfitting")
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
    ("1", "MoLoRA top-2 beats one LoRA with as many parameters (the gain is routing's, not capacity's)",
     "MoLoRA-15 beats LoRA by ~5.7% at T5-3B; at matched sizes MoV's gain over LoRA shrinks as the "
     "budget grows (2.42, 1.72, 0.29 points) [unverified]", routing_not_capacity),
    ("2", "Soft routing >= top-2 (MoLoRA, same E and r; top-1 not run)",
     "MoV-10: soft 59.93, top-2 57.45, top-1 54.92 [unverified]",
     lambda S: at_least(S, "MoLoRA soft", "MoLoRA top-2")),
    ("3", "A shared A loses nothing, at ~60% of the parameters (MoSL vs per-expert A, q/v)",
     "MoSLD T1/T5: MoSL 70.88 vs MoLA 70.00 at 62% of the parameters", shared_a),
    ("3", "MALoRA >= MoLoRA at matched parameters", "MALoRA T1: 56.3 vs 55.3 (158.9M vs 151.2M parameters)",
     lambda S: at_least(S, "MALoRA", MATCHED)),
    ("3", "Dropout on A beats dropout on B (MoSLD, finite data)", "MoSLD T2: 71.56 vs 70.73 (mixture)",
     lambda S: beats(S, "MoSLD p=0.1" + FINITE, "MoSLD dropout on B" + FINITE)),
    ("4", "DropConnect on A: p=0.1 beats p=0 (finite data)", "MoSLD T1: 71.56 vs 70.88 (mixture)",
     lambda S: beats(S, "MoSLD p=0.1" + FINITE, "MoSL p=0" + FINITE)),
    ("4", "DropConnect on A: p=0.3 is visibly worse than p=0.1 (finite data)",
     "MoSLD Fig. 5: accuracy mostly falls as p rises",
     lambda S: beats(S, "MoSLD p=0.1" + FINITE, "MoSLD p=0.3" + FINITE)),
    ("5", "Raising the rank overfits MoLoRA sooner than MALoRA (finite data)",
     "MALoRA T11: MoLoRA r=4/8/16/32 53.12/55.33/56.19/55.74; MALoRA 54.28/56.27/56.61/56.69", overfits),
    ("6", "MALoRA's step is faster than MoLoRA's (x S_A computed once)",
     "MALoRA T10: 14.69 s vs 17.57 s, 0.84x", step_time),
    ("7", f"Adding a domain ({NEW}) keeps old tasks, touches <= 25% of the MoLoRA run here, matches it on {NEW}",
     "MoDULA: 19.8% of the parameters; T4 FinGPT Res 80.61 vs MoLoRA 75.41 (Qwen-7B)", pluggable),
    ("8", "Residual: MoDULA-Res >= MoDULA-Flan", "MoDULA T1: Res 51.36 vs Flan 50.32 (Qwen-7B)",
     lambda S: at_least(S, "MoDULA-Res", "MoDULA-Flan")),
    ("8", f"MoDULA-Res keeps the general task ({tasks.GENERAL}) within 2 points of the base",
     "MoDULA T3: LLaMA-2-7B MMLU base 45.91, Res 48.23", keeps_general),
    ("9", "Shared family: one LoRA on the mixture is below one LoRA per task, and every mixture beats it",
     "the tasks of every paper's mixture share knowledge; none reports a family without", shared_family),
    ("9", "A shared input side gains more where tasks share a skill (MoSLD, vs MoLoRA top-2)",
     "MoSLD §1: the shared A holds the tasks' general knowledge", lambda S: premise(S, "MoSLD p=0.1")),
    ("9", "A shared subspace gains more where tasks share a skill (MALoRA, vs MoLoRA top-2)",
     "MALoRA §1: a shared low-rank subspace across experts", lambda S: premise(S, "MALoRA")),
    ("9", "A universal expert gains more where tasks share a skill (MoDULA-Res, vs MoLoRA top-2)",
     "MoDULA §3: the universal expert holds general knowledge", lambda S: premise(S, "MoDULA-Res")),
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


def table(S: dict, rows: list, family: str, headline: dict, epochs: bool = False) -> list:
    """A markdown table of `rows` (mean ± std over seeds): the headline tasks, their mean, the tasks
    reported apart, per-digit mean, the general task, and each row's budget."""
    counted = headline.get(family, tasks.FAMILIES[family])
    apart = [t for t in tasks.FAMILIES[family] if t not in counted]
    cols = [*counted, "mean", *[f"{t} (apart)" for t in apart], "per-digit mean", f"{tasks.GENERAL} (general)"]
    opt = lambda ss, k: "—" if ss[0][k] is None else f"{ss[0][k]:,}"            # noqa: E731
    extra = ["epochs", "final train loss"] * epochs
    out = [f"| method | trainable params | {' | '.join(cols)} | optimiser steps | tokens | {' | '.join(extra + [''])}"
           f"tokens/s | wall s |", "|---" * (len(cols) + 6 + len(extra)) + "|"]
    for row in (r for r in rows if r in S):
        ss = S[row]
        accs = [fmt([s["acc"][t] for s in ss]) for t in counted]
        aparts = [fmt([s["acc"][t] for s in ss]) for t in apart]
        digits = "—" if ss[0]["digit_mean"] is None else fmt([s["digit_mean"] for s in ss])
        ep = [f"{ss[0]['epochs']:.1f}" if ss[0]["epochs"] else "—",
              "—" if ss[0]["final_loss"] is None else fmt([s["final_loss"] for s in ss], 3)] if epochs else []
        out.append(f"| {row} | {ss[0]['params']:,} | {' | '.join(accs)} | {fmt([s['mean'] for s in ss])} | "
                   + "".join(f"{x} | " for x in aparts) + f"{digits} | {fmt([s['general'] for s in ss])} | "
                   f"{opt(ss, 'opt_steps')} | {opt(ss, 'tokens')} | " + "".join(f"{x} | " for x in ep)
                   + f"{fmt([s['tps'] for s in ss], 0)} | {fmt([s['wall'] for s in ss], 0)} |")
    return out


def report(S: dict, runs: list, checks: list, head: list, notes: list, headline: dict, lrs: dict,
           figures: dict, r: int) -> str:
    """RESULTS.md: the budget, the tables of every block (mean ± std over seeds), the verdicts."""
    block = lambda name: list(dict.fromkeys(x.row for x in runs if x.block == name))   # noqa: E731
    apart = [t for t in tasks.TASKS if t not in headline.get("maps", tasks.TASKS)]
    out = [*head, "", "## Comparison: the maps family (exact-match accuracy %, mean ± std over seeds)", "",
           "Optimiser steps and tokens are those of one seed, summed over every run and stage of the row. "
           f"The mean is over the tasks that the per-task reference learns (>= {LEARNED:g} %)"
           + (f"; {', '.join(apart)} is not learned by it in this budget, so it is reported apart, "
              "outside the mean." if apart else "."), "",
           *table(S, block("main"), "maps", headline), *figures.get("main", [])]
    sizes = [(curve, rows) for curve, rows in curves(r).items() if any(x in S for x in rows)]
    if sizes:
        out += ["", "## Accuracy against trainable parameters (maps family)", "",
                "Each method at three or more sizes on its main row's linears; the main row is one of them. "
                f"Rows no verdict uses have {SIZE_SEEDS} seeds. Rank is the per-expert rank of the budget "
                "(MALoRA: the MoLoRA rank it replaces; MoDULA: the domain rank, the universal expert's is "
                "twice it; MoSLD: the rank of its shared A and of each B).", "",
                "| method | " + " | ".join(f"size {i + 1}" for i in range(max(len(x) for _, x in sizes))) + " |",
                "|---" * (1 + max(len(x) for _, x in sizes)) + "|"]
        out += [f"| {curve} | " + " | ".join(
            f"rank {k}: {fmt([s['mean'] for s in S[x]])} ({S[x][0]['params']:,} params)" if x in S
            else f"rank {k}: not run" for k, x in zip(size_ranks(r)[curve][3], rows)) + " |" for curve, rows in sizes]
        out += figures.get("sizes", [])
    if any(x in S for x in block("finite")):
        out += ["", f"## Finite data: {TRAIN_EXAMPLES} fixed training examples per task (checks 3-5)", "",
                "The same tasks, with a training set drawn once and seen once per epoch, so that "
                "regularisation and overfitting can show; held-out inputs as everywhere. The final "
                "training loss tells the two ways to fail apart: overfitting has a low one, a run that "
                "did not train (an lr too high for its size) a high one.", "",
                *table(S, block("finite"), "maps", headline, epochs=True)]
    if any(x in S for x in block("shared")):
        out += ["", "## The shared family (check 9)", "",
                "swap1..swap4: every task needs 9 - d (which the base lacks), then swaps two pairs of "
                "digits of its own, so the tasks agree on six answers in ten.", "",
                *table(S, block("shared"), "shared", headline)]
    staged = [x for x in dict.fromkeys(x.row for x in runs) if x in S and S[x][0]["own_expert"] is not None]
    if staged:
        out += ["", "## Staged methods: routed, and each task through its own expert alone", "",
                "The second column is the experts' quality apart from the router's (oracle routing: "
                "task t through expert t only); the gap between the columns is the router's.", "",
                "| method | routed, mean | own expert alone, mean |", "|---|---|---|"]
        out += [f"| {x} | {fmt([s['mean'] for s in S[x]])} | {fmt([s['own_expert'] for s in S[x]])} |"
                for x in staged]
    out += figures.get("usage", [])
    if lrs:
        out += ["", "## Learning rates", "",
                f"Each configuration's peak lr is the best of {', '.join(f'{x:g}' for x in LR_GRID)} on the "
                "validation split (mean exact match over its tasks, one seed outside the evaluation seeds, "
                "the main budget); every row of that method trains at it. Staged methods' router stages "
                "run at it times their router_lr_scale. Each rank of the rank sweep (check 5, `-finite`) "
                f"has its own, the best of {', '.join(f'{x:g}' for x in SWEEP_LR_GRID)} on the validation split "
                f"after training on its {TRAIN_EXAMPLES} examples per task: one lr for ranks 1 to 16 would "
                "judge the lr, not the rank. The size rows train at their method's main lr.", "",
                "| configuration | " + " | ".join(f"val. acc. at {x:g}" for x in GRID_COLUMNS) + " | chosen |",
                "|---" * (len(GRID_COLUMNS) + 2) + "|"]
        out += [f"| {key} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in vals) + f" | {lr:g} |"
                for key, (lr, vals) in lrs.items()]
    out += ["", "## Qualitative checks (the papers' claims, on these tasks)", "",
            VERDICT_RULE.replace("\n", " "), "", "| § | claim | here | ours | paper |", "|---|---|---|---|---|"]
    out += [f"| {n} | {claim} | **{v}** | {ours} | {paper} |" for n, claim, v, ours, paper in checks]
    return "\n".join(out + ["", "## Notes", "", *[f"- {n}" for n in notes or ["none"]], ""])


def head_lines(budget: dict, records: list, base: str, how: str, then: str) -> list:
    """RESULTS.md's title and budget paragraph: `how` the runs came about, `then` what followed."""
    b = budget
    title = "every method under one budget" + " (QUICK RUN: a smoke test, not the comparison)" * b["quick"]
    return [f"# Results: {title}", "",
            f"{how}: {b['steps']} steps per run, each configuration at its own peak lr (below), per-expert "
            f"rank {b['rank'] or 'as each method default'}, {b['seeds']} seed(s) ({SIZE_SEEDS} for the "
            f"size rows no verdict uses), {b['eval_examples']} held-out examples per task, base {base} (shared); "
            f"{b['jobs']} train.py process(es) at once, one thread each; the runs' wall times sum to "
            f"{sum(r['wall_seconds'] for r in records) / 60:.1f} min. {then}",
            *["", BUDGET_NOTE.replace("\n", " ")] * (b["rank"] == 2),
            "", "Why the comparison is built this way (budgets, lr rule, task families, finite data, the "
                "add-a-domain control): [docs/comparison.md](../docs/comparison.md)."]


def draw(S: dict, runs: list, records: list, out_dir: str, headline: dict, budget: str, r: int) -> dict:
    """The figures (figures.py; skipped with one line without matplotlib): block -> markdown lines."""
    import figures
    if why := figures.available():
        return {"main": ["", why]}
    main = [x for x in dict.fromkeys(x.row for x in runs if x.block == "main") if x in S]
    counted = list(headline.get("maps", tasks.TASKS))
    lines = figures.draw_all({x: S[x] for x in main + [x for rows in curves(r).values() for x in rows if x in S]},
                             curves(r), main, counted, tasks.GENERAL,
                             [x for x in records if x["row"] in main], out_dir, budget,
                             apart=tuple(t for t in tasks.TASKS if t not in counted))
    split = lambda key: [x for x in lines if key in x]                          # noqa: E731
    return {"main": ["", *split("tasks.png")], "sizes": ["", *split("accuracy.png")],
            "usage": ["", *split("usage-")]}


def chosen_lrs(records: list) -> dict:
    """Tune key -> (chosen lr, [validation mean % per GRID_COLUMNS lr, None where not run]) from the tune
    runs: the best validation mean, the smaller lr on a tie."""
    out = {}
    for rec in (x for x in records if x["run"].startswith("tune-")):
        key, lr = rec["run"][len("tune-"):].rsplit("-lr", 1)
        out.setdefault(key, {})[float(lr)] = 100 * statistics.mean(rec["val_accuracy"].values())
    return {key: (max(sorted(vals), key=lambda x: vals[x]), [vals.get(x) for x in GRID_COLUMNS])
            for key, vals in out.items()}


def publish(records: list, runs: list, out_dir: str, head: list, notes: list, r: int, budget: str) -> list:
    """The figures and RESULTS.md into out_dir; returns the notes."""
    headline = headline_tasks(records)
    S = summarize(records, headline)
    os.makedirs(out_dir, exist_ok=True)
    figs = draw(S, runs, records, out_dir, headline, budget, r)
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(report(S, runs, verdicts(S), head, notes, headline, chosen_lrs(records), figs, r))
    return notes


def budget_text(b: dict) -> str:
    return f"{b['steps']} steps, {b['seeds']} seed(s), rank {b['rank']}"


def rejudge(path: str) -> None:
    """--report: RESULTS.md and the figures again, next to results.json, from the runs it records
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
    publish(records, run_table(b["rank"], matched_molora_rank(b["rank"])), os.path.dirname(os.path.abspath(path)),
            head, data["notes"], b["rank"], budget_text(b))
    print(f"wrote {os.path.join(os.path.dirname(path), 'RESULTS.md')} from {path} ({len(records)} runs)")


# ----------------------------------------------------------------------------- main
if __name__ == "__main__":
    a = p.parse_args()
    if a.report:
        rejudge(a.report)
        sys.exit(0)
    quick = a.quick
    a.steps = a.steps or (50 if quick else 300)
    a.seeds = a.seeds or (1 if quick else MIN_SEEDS)
    a.eval_examples = a.eval_examples or (50 if quick else 300)
    a.out = a.out or ("results/quick" if quick else "results")
    for flag in ("steps", "seeds", "eval_examples", "jobs"):
        if getattr(a, flag) < 1:
            sys.exit(f"compare.py: --{flag.replace('_', '-')} {getattr(a, flag)}: must be >= 1")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    grid = (3e-3,) if quick else None                      # None: each configuration's lr_grid
    runs, notes = run_table(a.rank, matched_molora_rank(a.rank)), []
    if quick:                                              # a smoke test: no size rows
        runs = [r for r in runs if r.block != "sizes"]
    tune = [Run(f"tune-{key}-lr{lr:g}", key, args, key, "tune", seeds=1)
            for key, args in tune_table(a.rank).items() for lr in (grid or lr_grid(key))]
    run_dir = lambda name, seed: os.path.join(a.out, "runs", name, f"seed{seed}")   # noqa: E731

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
    lr_of = {}                                             # tune key -> chosen lr, after the tune runs

    def command(run, seed):
        steps = max(1, a.steps)
        lr = float(run.name.rsplit("-lr", 1)[1]) if run.block == "tune" else lr_of[run.lr]
        cmd = ["train.py", *run.args, "--steps", str(steps), "--lr", f"{lr:g}", "--seed", str(seed),
               "--eval-examples", str(a.eval_examples), "--init-from", base, "--out", run_dir(run.name, seed)]
        cmd += ["--val-examples", str(min(200, a.eval_examples))] if run.block == "tune" else []
        return cmd + (["--init-adapter", os.path.join(run_dir(run.after, seed), "adapter.safetensors")]
                      if run.after else [])

    failed, ran = {}, []                                   # ran: the runs this invocation trained
    earlier = recorded(os.path.join(ROOT, a.out, "results.json")) if a.reuse else {}
    reused = set()                                         # (run, seed) taken from `earlier`

    def on_disk(run, seed) -> bool:
        return finished(os.path.join(ROOT, run_dir(run.name, seed)), command(run, seed))

    def done(run, seed) -> bool:
        return on_disk(run, seed) or (run.name, seed) in reused

    bar = tqdm(total=len(tune) + sum(min(a.seeds, r.seeds or a.seeds) for r in runs), desc="compare",
               dynamic_ncols=True)

    def work(job):
        run, seed = job
        if a.collect and not done(run, seed):
            failed[run.name, seed] = "not run yet"
        elif (run.after, seed) in failed:
            failed[run.name, seed] = f"needs {run.after}, which failed"
        elif not done(run, seed):
            bar.set_postfix_str(f"{run.name} seed {seed}")
            ran.append(job)
            if why := execute(command(run, seed), os.path.join(ROOT, run_dir(run.name, seed))):
                failed[run.name, seed] = why
        bar.update()

    def load(run, seed):
        if (run.name, seed) in reused:
            return {**earlier[run.name, seed], "row": run.row, "task": run.task}
        d = os.path.join(ROOT, run_dir(run.name, seed))
        with open(os.path.join(d, "metrics.json")) as f, open(os.path.join(d, "run.json")) as g:
            return {"run": run.name, "row": run.row, "task": run.task, **json.load(g), **json.load(f)}

    TUNE_SEED = 1000                                       # outside the evaluation seeds 0 .. seeds-1
    reused |= reuse_plan([(r, TUNE_SEED) for r in tune], earlier, command, on_disk, not a.collect)
    with ThreadPoolExecutor(a.jobs) as pool:               # 1: each configuration's lr, on validation
        list(pool.map(work, [(r, TUNE_SEED) for r in tune]))
    records = [load(r, TUNE_SEED) for r in tune if (r.name, TUNE_SEED) not in failed]
    lr_of.update({key: lr for key, (lr, _) in chosen_lrs(records).items()})
    if missing := set(tune_table(a.rank)) - set(lr_of):
        sys.exit(f"compare.py: no learning rate for {', '.join(sorted(missing))}: its tune runs failed "
                 f"({'; '.join(f'{n}: {w}' for (n, _), w in failed.items())})")
    # 2: every run at its configuration's lr: the rows verdicts use first (a run that starts from
    # another after it), then the size rows
    jobs = [(r, s) for s in range(a.seeds) for r in runs if s < (r.seeds or a.seeds)]
    reused |= reuse_plan(jobs, earlier, command, on_disk, not a.collect)
    with ThreadPoolExecutor(a.jobs) as pool:
        for group in (lambda r: not r.after and r.block != "sizes", lambda r: r.after, lambda r: r.block == "sizes"):
            list(pool.map(work, [j for j in jobs if group(j[0])]))
    bar.close()
    waiting = sorted(f"{name} seed {seed}" for (name, seed), why in failed.items() if why == "not run yet")
    notes += [f"{name} seed {seed}: FAILED, {why}" for (name, seed), why in failed.items() if why != "not run yet"]
    notes += [f"{len(waiting)} runs not run yet (`python compare.py` resumes them): {', '.join(waiting)}"] * bool(waiting)
    records += [load(run, seed) for run, seed in jobs if (run.name, seed) not in failed]
    wall = time.perf_counter() - t_start
    n_reused = len(reused - set(failed))
    head = head_lines(vars(a), records, base, f"`python compare.py {' '.join(sys.argv[1:])}`",
                      f"This invocation trained {len(ran)} of the {len(jobs) + len(tune)} runs (the others "
                      f"were finished already" + (f", {n_reused} of them taken from the results.json that was "
                                                  f"there, recorded with the same command (--reuse)" if n_reused else "")
                      + f") in {wall / 60:.1f} min (load average {load_start[0]:.1f} at the "
                      f"start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs).")
    notes = publish(records, runs, os.path.join(ROOT, a.out), head, notes, a.rank, budget_text(vars(a)))
    with open(os.path.join(ROOT, a.out, "results.json"), "w") as f:
        json.dump({"budget": vars(a), "runs": records, "notes": notes}, f, indent=1)
    print(f"wrote {a.out}/RESULTS.md and results.json ({len(records)} runs, {len(ran)} trained, {n_reused} "
          f"taken from the earlier results.json; {wall / 60:.1f} min)")
    sys.exit(1 if len(failed) > len(waiting) else 0)
