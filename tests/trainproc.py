"""Run `python train.py ...` many times, cheaply: a helper for the tests, not a test.

Each run is its own process, forked from one launcher that has imported train.py once, so a run
costs its own work rather than another `import torch` (seconds on a 2-core CI machine). The child
calls train.main(ARGS) as `python train.py ARGS` would: its own working folder, stdout and stderr,
and the exit status the interpreter gives an uncaught SystemExit. For what needs a process: exit
codes, a kill in the middle of a run, several runs at once.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")

LAUNCHER = r"""
import json, os, sys, traceback
import torch, train                               # once, in the launcher
runs, parallel = json.loads(sys.argv[1]), int(sys.argv[2])

def child(run):
    os.chdir(run["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(run[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    if run["kill_at"]:                            # die like `kill -9` right after the temp file of
        save, seen = torch.save, []               # checkpoint number kill_at, before its rename
        def save_then_die(obj, path, *a, **k):
            save(obj, path, *a, **k)
            seen.append(str(path).endswith("ckpt.pt.tmp"))
            if sum(seen) == run["kill_at"]:
                os._exit(9)
        torch.save = save_then_die
    sys.argv, code = run["argv"], 0
    try:
        train.main(sys.argv[1:])
    except SystemExit as e:                       # what the interpreter does with an uncaught one
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

running, codes = {}, {}
for run in runs:
    if len(running) == parallel:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        child(run)
    running[pid] = run["name"]
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


def run_train(tmp, runs: dict, kill_at: dict | None = None, parallel: int = 2) -> dict:
    """runs: name -> train.py arguments, run in folder `tmp`, `parallel` at a time. kill_at: name ->
    n, to kill that run after the temp file of its n-th checkpoint. Returns name -> CompletedProcess."""
    todo = [dict(name=name, argv=[TRAIN, *map(str, args)], cwd=str(tmp), kill_at=(kill_at or {}).get(name),
                 stdout=str(tmp / f"{name}.stdout"), stderr=str(tmp / f"{name}.stderr"))
            for name, args in runs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(todo), str(parallel)], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout)
    return {r["name"]: subprocess.CompletedProcess(r["argv"], codes[r["name"]], open(r["stdout"]).read(),
                                                   open(r["stderr"]).read()) for r in todo}


def train_in(folder, *args, out="run") -> dict:
    """train.main(ARGS --out folder/out) in this process, with `folder` as the working folder (the
    cached base lands in folder/out/base); returns the run's metrics.json."""
    import train
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        train.main([*map(str, args), "--out", str(folder / out)])
    finally:
        os.chdir(cwd)
    return json.loads((folder / out / "metrics.json").read_text())
