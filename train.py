"""Fine-tune a tiny GPT with one mixture-of-LoRA method on the synthetic tasks, end to end.

    python train.py --method malora            # pretrain (or reuse) the base, fine-tune, evaluate
    python train.py --method malora --resume   # continue from out/malora/ckpt.pt, same result
    torchrun --nproc_per_node 2 train.py --method malora   # DistributedDataParallel, same result

main(argv) runs one function per section, in order: arguments, seed and device, base model, inject
the method, fine-tune, evaluate, results. Writes metrics.json, adapter.safetensors and ckpt.pt (for
--resume) to out/<method>/; the pretrained base is cached under out/base/.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import tasks
from common import (Stage, adapter_meta, adapter_state_dict, append_expert, atomic_write, aux_loss,
                    base_hash, count_trainable, inject, layer_config, load_adapter,
                    load_adapter_state, save_adapter, stage_mode)
from gpt import GPT, GPTConfig, load_pretrained, save_checkpoint
from lora import LoRAConfig, LoRALinear
from malora import MALORA_SMALL, MALoRAConfig, MALoRALinear
from moa import MoAConfig, MoALinear, moa_metrics, moa_stages
from modula import MoDULAConfig, MoDULALinear, modula_stages
from molora import MoLoRAConfig, MoLoRALinear, molora_num_params
from mosld import MoSLDConfig, MoSLDLinear
from trainutil import (config_overrides, expert_usage, global_mean, init_distributed, load_checkpoint,
                       lr_at, print_results, print_usage, rng_state, save_atomic, set_rng_state)

METHODS = {
    "lora": (LoRAConfig, LoRALinear),
    "molora": (MoLoRAConfig, MoLoRALinear),
    "mosld": (MoSLDConfig, MoSLDLinear),
    "malora": (MALoRAConfig, MALoRALinear),
    "modula": (MoDULAConfig, MoDULALinear),
    "moa": (MoAConfig, MoALinear),
}
STAGES = {  # method -> stages(cfg, domains, general task, new domain or None) -> list[Stage]
    "modula": modula_stages, "moa": moa_stages,
}
EXTRA_METRICS = {  # method -> fn(model, layers, x (B, T), domain ids (B,)) -> dict, after evaluation
    "moa": moa_metrics,
}
VARIANTS = {  # named presets: --variant NAME sets these config fields
    "molora": {"soft": {}, "top2": {"top_k": 2}},
    "mosld": {"decreasing": {}, "increasing": {"num_experts": (2, 4, 6, 8)},   # §4.3 vs §5.2
              "mosl": {"drop_a": 0.0}, "drop-b": {"drop_a": 0.0, "drop_b": 0.1}},  # Tables 1-2
    "malora": {"default": {}, "small": MALORA_SMALL},
    "modula": {"res": {"variant": "res"}, "flan": {"variant": "flan"}},
    "moa": {"sequence": {}, "token": {"routing": "token"}},
}

# ----------------------------------------------------------------------------- arguments


def fail(msg: str):
    """A user's error: one line on stderr, exit status 1, nothing written."""
    sys.exit(f"train.py: {msg}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--variant", default=None, help="a named preset of the method (e.g. molora: soft, top2)")
    p.add_argument("--cfg", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the method's config, e.g. --cfg rank=4 (repeatable)")
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    p.add_argument("--pretrain-steps", type=int, default=1500, help="base-model pretraining steps")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak fine-tuning learning rate (AdamW, warm-up + cosine)")
    p.add_argument("--digits", type=int, default=6, help="L, digits per task input")
    p.add_argument("--family", default="maps", choices=list(tasks.FAMILIES),
                   help="the fine-tuning tasks: maps (one digit map each, conflicting) or shared (9 - d, "
                        "shared by every task, then a small map of its own)")
    p.add_argument("--train-examples", type=int, default=0, metavar="N",
                   help="a finite training set: N fixed examples per task, seen once per epoch "
                        "(default 0: fresh examples every step)")
    p.add_argument("--val-examples", type=int, default=0, metavar="N",
                   help="also score N validation examples per task (held out like the eval ones), for "
                        "choosing settings without touching the eval split (default 0: none)")
    p.add_argument("--n-layer", type=int, default=4, help="tiny GPT depth (when pretraining)")
    p.add_argument("--n-embd", type=int, default=128, help="tiny GPT width (when pretraining)")
    p.add_argument("--eval-examples", type=int, default=500, help="held-out examples per task")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (for CUDA)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode (default: reduce-overhead on CUDA, which replays each step "
                        "as CUDA graphs: the tiny GPT is launch-bound; default on CPU)")
    p.add_argument("--init-from", default="scratch",
                   help="'scratch' (pretrain or reuse out/base) or a checkpoint / GPT-2 model.safetensors")
    p.add_argument("--out", default=None, help="output folder (default out/<method>)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and order")
    p.add_argument("--init-adapter", default=None, metavar="PATH",
                   help="start from an adapter.safetensors written by train.py (same method and base "
                        "model; its config is the default); with --steps 0 it is only evaluated")
    p.add_argument("--exclude-task", action="append", default=[], metavar="TASK",
                   help="leave a task out of fine-tuning (repeatable), e.g. to --add-domain it later")
    p.add_argument("--add-domain", default=None, metavar="TASK",
                   help="staged methods: grow the --init-adapter by one expert for TASK, then train "
                        "only that expert and the routers")
    p.add_argument("--router-only", action="store_true",
                   help="staged methods: train only the routers of the --init-adapter (its last stage), "
                        "no new expert: the control of an --add-domain run, same router steps")
    p.add_argument("--ckpt-every", type=int, default=100,
                   help="steps between checkpoints (DIR/ckpt.pt; one also ends every stage)")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/ckpt.pt; same arguments, same result as one run")
    return p.parse_args(argv)


@dataclass
class Setup:
    """What the arguments decide before anything runs."""
    cfg: object                  # the method's config
    layer_cls: type
    domains: tuple               # the tasks fine-tuned on, expert i <-> domains[i]
    out_dir: str
    family: tuple                # the family's tasks, all evaluated (with the general task)


def check_args(args) -> Setup:
    """Every check on the arguments, before any work: a bad value ends here in one line."""
    if args.method not in METHODS:
        fail(f"unknown method {args.method!r}; choose one of: {', '.join(METHODS)}")
    cfg_cls, layer_cls = METHODS[args.method]
    for flag, minimum in [("steps", 0), ("pretrain_steps", 1), ("batch_size", 1), ("digits", 1),
                          ("eval_examples", 1), ("ckpt_every", 1), ("train_examples", 0), ("val_examples", 0)]:
        if getattr(args, flag) < minimum:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {minimum}")
    if not 0 < args.lr < math.inf:
        fail(f"--lr {args.lr}: must be a positive number")
    saved_meta = {}
    if args.init_adapter is not None:                      # the adapter's config is the default
        try:
            saved_meta = adapter_meta(args.init_adapter)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if saved_meta.get("method") != args.method:
            fail(f"{args.init_adapter}: adapter method is {saved_meta.get('method')!r}, "
                 f"this run's is {args.method!r}")
    try:
        overrides = config_overrides(saved_meta.get("config", {}), args.method,
                                     VARIANTS.get(args.method, {}), args.variant, args.cfg)
    except ValueError as e:
        fail(str(e))
    family = tasks.FAMILIES[args.family]
    for t in [*args.exclude_task, *[args.add_domain] * bool(args.add_domain)]:
        if t not in family:
            fail(f"unknown task {t!r} in --family {args.family}; choose one of: {', '.join(family)}")
    for flag in ("add_domain", "router_only"):
        if getattr(args, flag) and (args.method not in STAGES or args.init_adapter is None):
            fail(f"--{flag.replace('_', '-')} needs --init-adapter and a method with domain experts "
                 f"({', '.join(STAGES)})")
    if args.add_domain and args.router_only:
        fail("--add-domain and --router-only: choose one (the second is the first's control)")
    domains = tuple(t for t in family if t not in args.exclude_task and t != args.add_domain)
    if not domains:
        fail("--exclude-task: no task left to fine-tune on")
    if saved_meta.get("tasks", list(domains)) != list(domains):
        fail(f"{args.init_adapter}: trained on tasks {saved_meta['tasks']}, this run has {list(domains)}")
    known = {f.name for f in dataclasses.fields(cfg_cls)}  # fields the run decides, if the config has them
    run_fields = {"num_domains": len(domains), "prompt_len": args.digits + 2}
    overrides = {**{k: v for k, v in run_fields.items() if k in known}, **overrides}
    try:
        cfg = cfg_cls(**overrides)
    except (TypeError, ValueError) as e:
        fail(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    out_dir = args.out or os.path.join("out", args.method)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out {out_dir}: exists and is not a folder")
    return Setup(cfg, layer_cls, domains, out_dir, family)


# ----------------------------------------------------------------------------- seed and device


@dataclass
class Run:
    """The process's place in the run and its data stream; `last_good` names what a failure keeps."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    gen: torch.Generator         # data order, the same on every device and rank
    pool: dict | None = None     # a finite training set (--train-examples): task -> (N, L) inputs
    last_good: str = "nothing was written"

    def batch_for(self, task_names):
        """This rank's share of a global batch drawn uniformly from the named tasks: inputs,
        targets (B/world, T), task ids (B/world,). Every rank draws the whole batch from `gen` and
        keeps its slice, so any number of processes trains on the data of one."""
        bs = self.args.batch_size
        ids = tasks.task_ids_for(task_names, bs, self.gen)
        tokens, P = tasks.make_batch(ids, self.args.digits, "train", self.gen, self.pool)
        x, y = tasks.lm_inputs(tokens, P)
        mine = slice(self.rank * bs // self.world, (self.rank + 1) * bs // self.world)
        return x[mine].to(self.device), y[mine].to(self.device), ids[mine].to(self.device)


def start(args) -> Run:
    torch.manual_seed(args.seed)
    rank, world, device = init_distributed(args.device)   # torchrun: one process per rank
    if args.batch_size % world:                            # the global batch, over all ranks
        fail(f"--batch-size {args.batch_size}: must be divisible by the number of processes ({world})")
    pool = tasks.train_pool((tasks.GENERAL, *tasks.FAMILIES[args.family]), args.train_examples, args.digits) \
        if args.train_examples else None
    return Run(args, rank, world, device, torch.Generator().manual_seed(args.seed), pool)


def lm_loss(model, x, y):
    logits = model(x)                                      # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def train(run: Run, model, params, task_names, steps, peak_lr, desc, extra_loss=lambda: 0.0,
          on_batch=lambda ids: None, start=0, opt_state=None, checkpoint=None):
    """AdamW over `params` for steps start..steps-1 on a mixture of `task_names`. Returns the last
    logged loss. checkpoint(done, opt) runs every --ckpt-every steps but the last."""
    args = run.args
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    net = DDP(model) if run.world > 1 else model           # averages the gradients over ranks
    mode = args.compile_mode or ("reduce-overhead" if run.device.type == "cuda" else "default")
    step_fn = torch.compile(net, mode=mode) if args.compile else net
    model.train()
    value = math.nan
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, dynamic_ncols=True,
               disable=run.rank > 0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        x, y, ids = run.batch_for(task_names)
        on_batch(ids)
        loss = lm_loss(step_fn, x, y) + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        save = checkpoint is not None and (step + 1) % args.ckpt_every == 0 and step < steps - 1
        if step % 50 == 0 or step == steps - 1 or save:
            value = global_mean(loss.detach(), run.world).item()   # the loss of the global batch
            if not math.isfinite(value):
                fail(f"{desc}: loss is {value} at step {step}; {run.last_good}")
            bar.set_postfix(loss=f"{value:.3f}")
        if save:
            checkpoint(step + 1, opt)
    model.eval()
    return value


# ----------------------------------------------------------------------------- base model


def base_model(run: Run):
    """The frozen base and where it came from: pretrained here on the general task (cached under
    out/base/, keyed by its settings) or loaded from --init-from. Returns (model, base path)."""
    args, L = run.args, run.args.digits
    if args.init_from != "scratch":
        try:
            model = load_pretrained(args.init_from)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if model.cfg.vocab_size < tasks.VOCAB_SIZE or model.cfg.block_size < 2 * L + 2:
            fail(f"{args.init_from}: vocab {model.cfg.vocab_size} / block {model.cfg.block_size} too "
                 f"small for the tasks (need {tasks.VOCAB_SIZE} / {2 * L + 2})")
        return model.to(run.device).eval(), args.init_from
    try:
        gpt_cfg = GPTConfig(vocab_size=tasks.VOCAB_SIZE, block_size=2 * L + 2, n_layer=args.n_layer,
                            n_embd=args.n_embd, n_head=max(1, args.n_embd // 32))
    except ValueError as e:
        fail(str(e))
    key = json.dumps([dataclasses.asdict(gpt_cfg), args.pretrain_steps, args.seed], sort_keys=True)
    path = os.path.join("out", "base", hashlib.sha1(key.encode()).hexdigest()[:10] + ".pt")
    if os.path.exists(path):
        try:
            model = load_pretrained(path)
        except ValueError as e:
            fail(f"{e}; delete it to pretrain the base again")
    else:                                                  # pretrain on the general task only
        model = GPT(gpt_cfg).to(run.device)
        train(run, model, list(model.parameters()), [tasks.GENERAL], args.pretrain_steps, 3e-3,
              "pretrain base")
        if run.rank == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_checkpoint(model, path)
    return model.to(run.device).eval(), path


# ----------------------------------------------------------------------------- inject the method


def accuracies(run: Run, model, names, per_digit: dict | None = None, n=None, split="eval") -> dict:
    """Held-out exact-match accuracy on the named tasks, n (default --eval-examples) examples each
    from `split` (rank 0 only: the others get {}); each task's per-digit accuracy goes into
    `per_digit` when one is given."""
    if run.rank > 0:
        return {}
    acc = {}
    for t in tqdm(names, desc=f"evaluate ({split})", dynamic_ncols=True):
        acc[t], digit = tasks.scores(model, t, n or run.args.eval_examples, run.args.digits, split=split)
        if per_digit is not None:
            per_digit[t] = digit
    return acc


def inject_method(run: Run, setup: Setup, model):
    """Adapt the base with the method (and its --init-adapter). Returns the adapted layers."""
    torch.manual_seed(run.args.seed)                       # the same adapter init and data order
    run.gen.manual_seed(run.args.seed + 1)                 # whether the base was pretrained or reused
    depth = model.cfg.n_layer                              # per-layer configs: MoSLD's experts by depth
    cfg, layer_cls = setup.cfg, setup.layer_cls
    try:
        layers = inject(model, lambda lin, name: layer_cls(lin, layer_config(cfg, name, depth)), cfg.targets)
    except ValueError as e:                                # a config that does not fit this model
        fail(str(e))
    model.to(run.device)
    if run.args.init_adapter is not None:
        try:
            load_adapter(model, run.args.init_adapter)     # checks its base and layer class too
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    return layers


def add_domain(run: Run, setup: Setup, model, layers):
    """--add-domain TASK (MoDULA §4.4; MoA's new domains): one more expert and router row in every
    layer, then its stages train that expert and the routers. Returns the updated Setup and a
    function acc -> the report (parameters touched against a MoLoRA retrain, old tasks kept)."""
    task = run.args.add_domain
    before = accuracies(run, model, (tasks.GENERAL, *setup.family))
    for layer in layers:
        append_expert(layer)                               # one more expert and router row each
    domains = (*setup.domains, task)
    setup = dataclasses.replace(setup, domains=domains,
                                cfg=dataclasses.replace(setup.cfg, num_domains=len(domains)))
    grown = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    def report(acc: dict) -> dict:
        retrain = sum(molora_num_params(m.base.in_features, m.base.out_features,
                                        MoLoRAConfig(targets=setup.cfg.targets)) for m in layers)
        touched = sum(int((v != grown[k]).sum()) for k, v in adapter_state_dict(model).items())
        return {"accuracy_before": before, "task": task, "init_adapter": run.args.init_adapter,
                "params_touched": touched, "molora_retrain_params": retrain,
                "touched_share": touched / retrain, "accuracy_after": acc,
                "max_old_task_drop": max(before[t] - acc[t] for t in (tasks.GENERAL, *domains[:-1]))}
    return setup, report


# ----------------------------------------------------------------------------- fine-tune


def domain_ids(setup: Setup, device) -> torch.Tensor:
    """(len(ALL_TASKS),) task id -> domain id (the expert of that task), -1 for the general task."""
    return torch.tensor([setup.domains.index(t) if t in setup.domains else -1
                         for t in tasks.ALL_TASKS], device=device)


def fine_tune(run: Run, setup: Setup, model, layers, plan: list, base_sha: str) -> dict:
    """Every stage of the plan in order, resumable (--resume) from DIR/ckpt.pt, which is written
    every --ckpt-every steps and at the end of each stage. Returns the log: stages, tokens, seconds."""
    args = run.args
    ckpt_path = os.path.join(setup.out_dir, "ckpt.pt")
    spec = json.loads(json.dumps({                         # what --resume needs unchanged
        "method": args.method, "config": dataclasses.asdict(setup.cfg), "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "digits": args.digits, "seed": args.seed,
        "family": args.family, "train_examples": args.train_examples,
        "base_sha256": base_sha}))
    ckpt = {"stage": 0, "step": 0, "optimizer": None, "stage_log": [], "tokens": 0.0, "seconds": 0.0}
    if args.resume:
        try:
            ckpt = load_checkpoint(ckpt_path, spec)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    log = {"stages": ckpt["stage_log"], "tokens": ckpt["tokens"], "seconds": ckpt["seconds"]}
    os.makedirs(setup.out_dir, exist_ok=True)
    domain_of = domain_ids(setup, run.device)              # task id -> domain id, for on_batch

    def save_ckpt(i, done, opt):
        """The state after `done` steps of stage i, all that --resume needs; rank 0 writes it."""
        state = adapter_state_dict(model)
        if not all(t.isfinite().all() for t in state.values()):
            fail(f"{plan[i].name}: non-finite adapter weights after step {done}; {run.last_good}")
        if run.rank == 0:
            save_atomic({"run": spec, "stage": i, "step": done, "adapter": state,
                         "rng": rng_state(run.gen), "optimizer": opt.state_dict() if opt else None,
                         "stage_log": log["stages"], "tokens": log["tokens"],
                         "seconds": log["seconds"]}, ckpt_path)
        run.last_good = f"kept the last good checkpoint {ckpt_path} ({plan[i].name}, step {done})"

    for i, stage in enumerate(plan):
        if stage.setup is not None:
            stage.setup(layers)                            # also for done stages: their side effects
        if i < ckpt["stage"]:
            continue                                       # finished before the checkpoint
        begin = ckpt["step"] if i == ckpt["stage"] else 0
        if args.resume and i == ckpt["stage"]:             # back to the state after `begin` steps
            try:
                load_adapter_state(model, ckpt["adapter"], ckpt_path)
            except ValueError as e:
                fail(str(e))
            set_rng_state(ckpt["rng"], run.gen)
        params = stage.params(layers)
        model.requires_grad_(False)
        for t in params:
            t.requires_grad_(True)
        steps = max(1, round(stage.steps_frac * args.steps)) if args.steps else 0   # --steps 0: evaluate
        if begin >= steps:
            continue
        before = [t.detach().clone() for t in params]
        extra = stage.extra_loss or (lambda layers: 0.0)
        on_batch = stage.on_batch or (lambda layers, ids: None)
        t0, lr = time.perf_counter(), args.lr * stage.lr_scale
        loss = train(run, model, params, stage.tasks, steps, lr, f"{args.method} {stage.name}",
                     extra_loss=lambda: aux_loss(model) + extra(layers),
                     on_batch=lambda ids: on_batch(layers, domain_of[ids]),
                     start=begin, opt_state=ckpt["optimizer"] if begin else None,
                     checkpoint=lambda done, opt: save_ckpt(i, done, opt))
        dt = time.perf_counter() - t0
        tokens = (steps - begin) * args.batch_size * (2 * args.digits + 2)   # every rank's, exactly
        log["tokens"], log["seconds"] = log["tokens"] + tokens, log["seconds"] + dt
        log["stages"].append({"stage": stage.name, "steps": steps, "lr": lr, "seconds": round(dt, 2),
                              "trainable_params": count_trainable(model), "final_loss": loss,
                              "params_changed": sum(int((t != b).sum()) for t, b in zip(params, before))})
        save_ckpt(i, steps, None)                          # the stage is done
    return log


# ----------------------------------------------------------------------------- evaluate


def evaluate(run: Run, setup: Setup, model, layers) -> tuple[dict, dict]:
    """Accuracy on every task, and the method's own measurements: which expert each task uses
    (routed methods), MoA's router accuracy, and for staged methods each domain through its own
    expert alone (the experts apart from the router)."""
    digits, args, names = {}, run.args, (tasks.GENERAL, *setup.family)
    acc = accuracies(run, model, names, digits)
    extra = {"per_task_digit_accuracy": {t: digits[t] for t in setup.family}}
    if args.val_examples:                                  # for choosing settings (compare.py's lr)
        extra["val_accuracy"] = accuracies(run, model, setup.domains, n=args.val_examples, split="val")
    ids = torch.tensor([tasks.ALL_TASKS.index(t) for t in names]).repeat_interleave(100)  # 100 per task
    x_usage, _ = tasks.lm_inputs(*tasks.make_batch(ids, args.digits, "eval", torch.Generator().manual_seed(4321)))
    extra["expert_usage"] = expert_usage(model, x_usage.to(run.device), ids.to(run.device), tasks.ALL_TASKS)
    extra["expert_names"] = (["universal"] * (getattr(setup.cfg, "variant", "") == "flan")
                             + list(setup.domains) if args.method in STAGES else None)
    if args.method in EXTRA_METRICS:                       # e.g. MoA's router accuracy
        gen = torch.Generator().manual_seed(4321)
        ids = tasks.task_ids_for(setup.domains, args.eval_examples, gen)
        x_eval, _ = tasks.lm_inputs(*tasks.make_batch(ids, args.digits, "eval", gen))
        extra.update(EXTRA_METRICS[args.method](model, layers, x_eval.to(run.device),
                                                domain_ids(setup, run.device)[ids.to(run.device)]))
    if args.method in STAGES:
        oracle = {}
        for j, t in enumerate(setup.domains):
            stage_mode(j)(layers)
            oracle[t] = tasks.accuracy(model, t, args.eval_examples, args.digits)
        stage_mode(None)(layers)
        extra["oracle_routing_accuracy"] = oracle
    return acc, extra


# ----------------------------------------------------------------------------- results


def write_results(run: Run, setup: Setup, model, metrics: dict, base_path: str, base_sha: str):
    """The table, the adapter and metrics.json (each written whole, or not at all)."""
    args = run.args
    print_usage(metrics["expert_usage"], metrics["expert_names"])
    print_results(metrics, tasks.GENERAL)
    save_adapter(model, os.path.join(setup.out_dir, "adapter.safetensors"),
                 meta={"method": args.method, "variant": args.variant, "config": metrics["config"],
                       "targets": list(setup.cfg.targets), "layer": setup.layer_cls.__name__,
                       "base_sha256": base_sha, "tasks": list(setup.domains), "base": base_path})
    path = os.path.join(setup.out_dir, "metrics.json")
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    setup = check_args(args)
    run = start(args)
    model, base_path = base_model(run)
    base_acc = {t: tasks.accuracy(model, t, min(200, args.eval_examples), args.digits)
                for t in (tasks.GENERAL, *setup.family)} \
        if run.rank == 0 else {}
    layers = inject_method(run, setup, model)
    base_sha = base_hash(model)                            # kept in checkpoints and the adapter
    report = None
    if args.add_domain:
        setup, report = add_domain(run, setup, model, layers)
    adapter = [t for t in model.parameters() if t.requires_grad]
    plan = (STAGES[args.method](setup.cfg, setup.domains, tasks.GENERAL, args.add_domain)
            if args.method in STAGES else [Stage("fine-tune", setup.domains, params=lambda layers: adapter)])
    plan = plan[-1:] if args.router_only else plan             # the router stage alone
    t_start = time.perf_counter()
    log = fine_tune(run, setup, model, layers, plan, base_sha)
    for t in adapter:
        t.requires_grad_(True)                             # report the whole adapter as trainable
    wall = time.perf_counter() - t_start
    if run.world > 1:
        dist.destroy_process_group()
    if run.rank > 0:
        return                                             # rank 0 evaluates and writes the results
    acc, extra = evaluate(run, setup, model, layers)
    metrics = {
        "method": args.method, "variant": args.variant, "config": dataclasses.asdict(setup.cfg),
        "per_task_accuracy": {t: acc[t] for t in setup.family}, "family": args.family,
        "general_accuracy": acc[tasks.GENERAL],
        "base_accuracy": base_acc,
        "trainable_params": count_trainable(model),
        "total_params": sum(t.numel() for t in model.parameters()),
        "tokens_per_second": log["tokens"] / log["seconds"] if log["seconds"] else 0.0,
        "finetune_seconds": wall,
        "steps": args.steps, "optimizer_steps": sum(s["steps"] for s in log["stages"]),   # all stages
        "tokens_trained": round(log["tokens"]),                    # over all stages and processes
        "stages": log["stages"], "tasks": list(setup.domains), **extra,
        "add_domain": report(acc) if report else None,
        "seed": args.seed, "device": args.device, "processes": run.world,
        "train_examples": args.train_examples or None,
        "epochs": log["tokens"] / (2 * args.digits + 2) / (args.train_examples * len(setup.domains))
        if args.train_examples else None,
    }
    write_results(run, setup, model, metrics, base_path, base_sha)


if __name__ == "__main__":
    main()
