"""train.py's plumbing: several processes (torchrun), random-number state, resumable checkpoints,
the run's settings (config overrides, learning-rate schedule), its final table and the expert
usage it records.

Kept apart so that train.py still reads top to bottom as one run. Nothing here knows a method.

    torchrun --nproc_per_node N train.py ...   each process draws the whole global batch from the
                                               same seeded generator and keeps its 1/N slice, so N
                                               processes train on exactly the data of one
    DIR/ckpt.pt                                the adapter, optimizer, stage and step, RNG states:
                                               all a resumed run needs to continue bit for bit

Not included: sharded (FSDP) checkpoints, several checkpoints kept side by side, elastic restarts.
"""
import json
import math
import os

import torch
import torch.distributed as dist

from common import AdaptedLinear, Router, atomic_write, first_line


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
    """torch.save, atomically (common.atomic_write): a kill at any moment leaves the last whole file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str, run: dict) -> dict:
    """A checkpoint written by save_atomic for the same run. `run` holds what must not change
    between the interrupted run and its resumption (method, config, steps, batch, lr, seed, base).
    Raises FileNotFoundError, or ValueError with one line naming the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path} (a run writes one every --ckpt-every steps)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                   # torch raises many types for a bad file
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line(e)})") from e
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


# ----------------------------------------------------------------------------- run settings


def parse_value(text: str):
    """--cfg values: JSON when it parses (4, 0.1, true, null, [8,6]), else the bare string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_overrides(saved: dict, method: str, presets: dict, variant: str | None, cfg_args: list) -> dict:
    """The config fields a run sets, later ones winning: a saved adapter's config (--init-adapter),
    the --variant preset, each --cfg FIELD=VALUE. JSON lists become tuples, as the configs hold them.
    ValueError with the message for the user on an unknown variant or a malformed --cfg."""
    tup = lambda v: tuple(v) if isinstance(v, list) else v       # noqa: E731
    overrides = {k: tup(v) for k, v in saved.items()}
    if variant is not None:
        if variant not in presets:
            raise ValueError(f"unknown variant {variant!r} for {method}; choose one of: "
                             f"{', '.join(presets) or '(none)'}")
        overrides.update(presets[variant])
    for item in cfg_args:
        field, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--cfg {item!r}: expected FIELD=VALUE")
        overrides[field] = tup(parse_value(value))
    return overrides


def lr_at(step, steps, peak, warmup_frac=0.05):
    """Linear warm-up then cosine decay to 0 (MoSLD and MALoRA give no schedule; docs/interpretations.md)."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def print_results(m: dict, general: str):
    """The one table at the end of a run, from its metrics.json: accuracy per task (base, the
    method, and each domain through its own expert for staged methods), then the stages and the
    --add-domain report."""
    acc = {**m["per_task_accuracy"], general: m["general_accuracy"]}
    oracle = m.get("oracle_routing_accuracy", {})
    print(f"\n{'task':<10} {'base':>6} {m['method']:>8}" + ("  own expert alone" if oracle else ""))
    for t, base in m["base_accuracy"].items():
        label = f"{t}*" if t == general else t
        print(f"{label:<10} {base:>6.1%} {acc[t]:>8.1%}" + (f" {oracle[t]:>18.1%}" if t in oracle else ""))
    mean = sum(m["per_task_accuracy"].values()) / len(m["per_task_accuracy"])
    print(f"(* general task: the base was pretrained on it; a drop is forgetting)\n"
          f"mean task accuracy {mean:.1%}, trainable {m['trainable_params']:,} of {m['total_params']:,} "
          f"parameters, {m['tokens_per_second']:,.0f} tokens/s, fine-tune {m['finetune_seconds']:.0f}s")
    for s in m["stages"] if len(m["stages"]) > 1 else []:
        print(f"stage {s['stage']:<16} {s['steps']:>5} steps {s['seconds']:>7.1f}s "
              f"{s['params_changed']:>9,} parameters changed")
    if added := m["add_domain"]:
        print(f"added {added['task']}: {added['params_touched']:,} parameters touched, "
              f"{added['touched_share']:.1%} of a MoLoRA retrain ({added['molora_retrain_params']:,}); "
              f"largest old-task drop {added['max_old_task_drop']:+.1%}")


# ----------------------------------------------------------------------------- expert usage


@torch.no_grad()
def expert_usage(model, x: torch.Tensor, labels: torch.Tensor, names) -> dict:
    """Which experts each task uses: {layer name: {task name: [mean gate of each expert]}}.

    x (B, T) token ids, labels (B,) indices into `names` (the task of each sequence). One forward
    in eval mode; every adapted layer whose Router kept gates contributes the mean of its tokens'
    gates (N = B*T, E), first over each sequence's T tokens, then over the sequences of each task.
    Tasks without a sequence in x are left out, and so are layers whose forward did not route
    (a MoDULA layer in a single-expert stage)."""
    routers = {name: m.router for name, m in model.named_modules()
               if isinstance(m, AdaptedLinear) and isinstance(getattr(m, "router", None), Router)}
    for router in routers.values():
        router.gates = None                                        # no stale gates from before
    was_training = model.training
    model.eval()
    model(x)
    model.train(was_training)
    usage = {}
    for name, router in routers.items():
        if router.gates is not None:
            per_seq = router.gates.view(*x.shape, -1).float().mean(1)   # (B, E)
            usage[name] = {t: per_seq[labels == i].mean(0).tolist()
                           for i, t in enumerate(names) if (labels == i).any()}
    return usage


def print_usage(usage: dict, expert_names: list | None):
    """expert_usage in one line per adapted layer. With named experts (staged methods: a domain
    each, MoDULA-Flan's universal one first), each task's share of its gate mass on its own expert,
    and for a task without one (the general task) its top expert; otherwise each task's top expert
    (e0, e1, ...) and its share."""
    if not usage:
        return
    print("expert usage: " + ("share of each task's gate mass on its own expert" if expert_names
                              else "each task's top expert and its share of the gate mass"))
    for layer, per_task in usage.items():
        cells = []
        for t, g in per_task.items():
            names = expert_names or [f"e{e}" for e in range(len(g))]
            top = max(range(len(g)), key=g.__getitem__)
            cells.append(f"{t} {g[names.index(t)]:.2f}" if t in names else f"{t} {names[top]} {g[top]:.2f}")
        print(f"  {layer:<20} " + "  ".join(cells))
