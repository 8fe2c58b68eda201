"""train.py's plumbing: several processes (torchrun), random-number state, and resumable checkpoints.

Kept apart so that train.py still reads top to bottom as one run. Nothing here knows a method.

    torchrun --nproc_per_node N train.py ...   each process draws the whole global batch from the
                                               same seeded generator and keeps its 1/N slice, so N
                                               processes train on exactly the data of one
    DIR/ckpt.pt                                the adapter, optimizer, stage and step, RNG states:
                                               all a resumed run needs to continue bit for bit

Not included: sharded (FSDP) checkpoints, several checkpoints kept side by side, elastic restarts.
"""
import os

import torch
import torch.distributed as dist


def init_distributed(device: str):
    """(rank, world size, torch.device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    gloo on CPU, nccl on CUDA with one GPU per process (LOCAL_RANK). Otherwise (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    return dist.get_rank(), world, dev


def global_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over all processes (the loss of the global batch), the same on each."""
    if world == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream a training step reads: torch's (dropout, DropConnect), CUDA's, the data's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "data": gen.get_state()}


def set_rng_state(state: dict, gen: torch.Generator):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["data"])


def save_atomic(obj: dict, path: str):
    """torch.save to path.tmp, then os.replace: a kill at any moment leaves the last whole file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, run: dict) -> dict:
    """A checkpoint written by save_atomic for the same run. `run` holds what must not change
    between the interrupted run and its resumption (method, config, steps, batch, lr, seed, base).
    Raises FileNotFoundError, or ValueError with one line naming the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path} (a run writes one every --ckpt-every steps)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                   # torch raises many types for a bad file
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {why})") from e
    if not isinstance(ckpt, dict) or not {"run", "stage", "step", "adapter"} <= ckpt.keys():
        raise ValueError(f"{path}: not a training checkpoint written by train.py")
    saved = ckpt["run"]
    for key, now in run.items():
        was = saved.get(key)
        if isinstance(was, dict) and isinstance(now, dict):      # name the config field that differs
            key, was, now = next(((f"{key}.{k}", was.get(k), now.get(k)) for k in {**was, **now}
                                  if was.get(k) != now.get(k)), (key, was, now))
        if was != now:
            raise ValueError(f"--resume: {path} was written with {key}={was!r}, this run has {key}={now!r}")
    return ckpt
