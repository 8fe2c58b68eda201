"""Speed of one adapted linear, forward + backward, router and balancing loss included.

    python bench.py                              # CPU: E = 4..64 at D = 256, about 1-2 minutes
    python bench.py --experts 8 --json           # one configuration, machine-readable
    python bench.py --full --device cuda --dtype bfloat16 --tokens 16384   # E x D = 4..64 x 256..4096
    python bench.py --experts 8 --train-step     # and a whole train step of the tiny GPT

For each (E, D) it times, side by side, round-robin, the median of --repeats after a warm-up:
  frozen base       the frozen nn.Linear alone
  single LoRA E*r   lora.LoRALinear of rank E*r: dense routing's GEMM work with no router, the floor
  router            common.Router + balancing loss alone (part of every method row below)
and for each method (MoLoRA, MoSLD, MALoRA, MoDULA-Flan and -Res, soft over its domain experts, MoA):
  fused             common.dispatch_fused: the path layer(x) takes below the E / K crossover
  naive dense       layer.forward_naive(x): the loop over experts, every expert on every token
  naive sparse      each expert on its routed tokens only, index_add back (MixLoRA-style, below)
  grouped           fast.dispatch_grouped: pairs sorted by expert, grouped GEMMs
  fused compiled    with --compile: common.dispatch_compiled, the fused path under torch.compile
A row's adapter cost is its time minus the frozen base's; every ratio printed is a ratio of
adapter costs. GFLOP: matmul FLOPs of that forward + backward, adapter part.
saved MiB: memory, what the forward keeps for the backward (activations), adapter part; exact and
the same on every device (autograd's saved-tensor hooks), so it is measured once, not timed.
x requires grad, as inside a model, so every row also computes dL/dx.

MoA's rows treat the N tokens as N / 16 sequences of 16: its fused row gathers one LoRA per
sequence (a single LoRA's work whatever E), its naive row loops over the E LoRAs.
Not included: the allocator's peak memory (saved MiB above is the part the method decides); a
fused Triton kernel.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import Router, aux_loss, dispatch_compiled, dispatch_fused, dispatch_naive, inject
from fast import dispatch_grouped
from gpt import GPT, GPTConfig
from lora import LoRAConfig, LoRALinear
from malora import MALoRAConfig, MALoRALinear
from moa import MoAConfig, MoALinear
from modula import MoDULAConfig, MoDULALinear
from molora import MoLoRAConfig, MoLoRALinear
from mosld import MoSLDConfig, MoSLDLinear

# name: (layer class, config class, config from E, r, K). MALoRA is the one that replaces a
# MoLoRA of rank r (S = r E / 2, r-bar = 1.5 r: MALoRA §3.2). Top-1 keeps Switch's unnormalised
# gate (the configs refuse a renormalised one; MoSLD, which always renormalises, is skipped at K = 1).
METHODS = {
    "molora": (MoLoRALinear, MoLoRAConfig,
               lambda C, E, r, K: C(num_experts=E, rank=r, top_k=K, renormalize=K > 1)),
    "mosld": (MoSLDLinear, MoSLDConfig, lambda C, E, r, K: C(num_experts=E, rank=r, top_k=K)),
    "malora": (MALoRALinear, MALoRAConfig,
               lambda C, E, r, K: C.from_molora(rank=r, num_experts=E, lam=0.5, top_k=K,
                                                renormalize=K > 1)),
    # MoDULA routes softly over its E domain experts (its stage 3 and inference): K does not apply;
    # per token, as Eq. 5-8 (the default pools each prompt: one router call per sequence, cheaper)
    "modula-flan": (MoDULALinear, MoDULAConfig,
                    lambda C, E, r, K: C(variant="flan", num_domains=E, domain_rank=r, universal_rank=2 * r,
                                         router_input="token")),
    "modula-res": (MoDULALinear, MoDULAConfig,
                   lambda C, E, r, K: C(variant="res", num_domains=E, domain_rank=r, universal_rank=2 * r,
                                        router_input="token")),
    # MoA routes per sequence: the N tokens are N / 16 sequences of 16, one LoRA each (gathered)
    "moa": (MoALinear, MoAConfig, lambda C, E, r, K: C(num_domains=E, rank=r)),
}
SOFT = {"modula-flan", "modula-res", "moa"}    # soft or one LoRA per sequence: no grouped path
SEQ = 16                                       # MoA's sequence length in the layer rows
FULL_EXPERTS, FULL_DIMS = [4, 8, 16, 32, 64], [256, 1024, 4096]
GOAL_SETTING = ("cpu", "float32", 4096, 256, 8, 8, 2)   # device, dtype, N, D, E, r, K of the CPU goals
GOALS = [                                      # (method, ratio, sign, bound, source)
    ("molora", "fused/single_lora", "<=", 1.10, "the floor: dense routing's GEMM work"),
    ("molora", "naive_dense/fused", ">=", 6.0, "the loop over experts"),
    ("molora", "naive_sparse/fused", ">=", 3.0, "a MixLoRA-style sparse loop"),
    ("mosld", "fused/molora_fused", "<=", 0.85, "shared A: x A^T once per token"),
    ("malora", "fused/molora_fused", "<=", 1.0, "MALoRA Table 10"),
    ("malora", "naive_dense/molora_naive_dense", "<=", 0.84, "MALoRA Table 10: 84 %"),
]

# ----------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
               help="dtype of x, the base and the adapter (routers mix in float32 anyway)")
p.add_argument("--tokens", type=int, default=4096, help="N, tokens in the batch")
p.add_argument("--dim", type=int, nargs="+", default=[256], help="D = I = O, one or more")
p.add_argument("--experts", type=int, nargs="+", default=FULL_EXPERTS, help="E, one or more")
p.add_argument("--rank", type=int, default=8, help="r, per expert (MoLoRA's; MALoRA's r-bar = 1.5 r)")
p.add_argument("--top-k", type=int, default=2, help="K, experts kept per token")
p.add_argument("--repeats", type=int, default=10, help="timed rounds; each row reports the median")
p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
p.add_argument("--methods", default="molora,mosld,malora,modula-flan,modula-res,moa",
               help="comma-separated, from: " + ", ".join(METHODS))
p.add_argument("--full", action="store_true",
               help=f"sweep E in {FULL_EXPERTS} and D in {FULL_DIMS} (hours on a CPU: for a GPU)")
p.add_argument("--compile", action="store_true",
               help="also time the fused path through common.dispatch_compiled (torch.compile)")
p.add_argument("--train-step", action="store_true",
               help="also time a whole train step (forward, backward, AdamW) of the tiny GPT")
p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
               help="wall: perf_counter, CUDA synchronized; cpu: this thread's CPU time with torch "
                    "on one thread, which other processes' load does not inflate (on a shared CPU)")
p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
p.add_argument("--os-malloc", action="store_true",
               help="leave glibc's malloc as it is, which returns freed blocks of a few MiB to the "
                    "OS and page-faults them in again; by default bench.py (CPU) serves every "
                    "block from a heap that is never trimmed (keep_freed_memory)")
args = p.parse_args()

if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("bench.py: --device cuda: no CUDA device is available")
for name in args.methods.split(","):
    if name not in METHODS:
        sys.exit(f"bench.py: --methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
if min(args.tokens, args.rank, args.top_k, *args.dim, *args.experts, args.repeats) < 1:
    sys.exit("bench.py: --tokens, --dim, --experts, --rank, --top-k and --repeats must be >= 1")
if args.clock == "cpu" and (args.device == "cuda" or (args.threads or 1) != 1):
    sys.exit("bench.py: --clock cpu times one CPU thread: not with --device cuda or --threads above 1")
if "moa" in args.methods.split(",") and args.tokens % SEQ:
    sys.exit(f"bench.py: --tokens {args.tokens}: MoA's rows need a multiple of {SEQ} (sequences of {SEQ})")
if args.top_k > min(args.experts):
    sys.exit(f"bench.py: --top-k {args.top_k} is more than the smallest --experts {min(args.experts)}")

# ----------------------------------------------------------------------------- device


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process, as PyTorch's CUDA caching allocator does.
    By default glibc maps each block of a few MiB (an (N, O) activation at N=4096, O=256 is 4 MiB)
    afresh and returns it to the OS when freed: a MoLoRA layer's forward + backward then takes
    ~2000 page faults (1-2 ms, about the router's whole cost), a LoRA's ~1400, and the counts
    drift with glibc's adaptive threshold, so repeated runs of one row differed by milliseconds.
    Every block then comes from the heap (no mmap), which is never trimmed. False, and nothing
    changed, where this is not glibc (macOS, musl: the timings then include the OS allocator)."""
    import ctypes
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                          # glibc's malloc.h
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or not mallopt(M_TRIM_THRESHOLD, 2 ** 30):
        return False
    if not mallopt(M_MMAP_MAX, 0):
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)                      # glibc's default, back again
        return False
    return True


kept_memory = args.device == "cpu" and not args.os_malloc and keep_freed_memory()
torch.manual_seed(args.seed)
device, dtype = torch.device(args.device), getattr(torch, args.dtype)
if args.threads is not None or args.clock == "cpu":
    torch.set_num_threads(args.threads or 1)
clock = time.thread_time if args.clock == "cpu" else time.perf_counter
experts, dims = (FULL_EXPERTS, FULL_DIMS) if args.full else (args.experts, args.dim)
N, r, K = args.tokens, args.rank, args.top_k
notes = []                                                 # skipped methods and configurations


def say(text: str):
    """Progress and tables go to stdout, unless --json asks for one clean JSON document there."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


methods = {name: METHODS[name] for name in args.methods.split(",")}

# ----------------------------------------------------------------------------- the naive sparse loop


def dispatch_sparse_loop(x, A, B, gates, scaling, act=None, idx=None, xa=None):
    """MixLoRA-style baseline, not a library path: each expert runs on the tokens whose gate for
    it is nonzero (a data-dependent nonzero per expert) and its output is added back with
    index_add. Same signature as common.dispatch_fused, so layer._run can use it."""
    y = x.new_zeros(x.shape[0], B.shape[1])                        # (N, O)
    for e in range(B.shape[0]):
        tok = gates[:, e].nonzero().squeeze(1)                     # (n_e,) tokens routed to e
        A_e = A if A.dim() == 2 else A[e]                          # (r, I)
        h = x[tok] @ A_e.T                                         # (n_e, r)
        if act is not None:
            h = act(h)
        y = y.index_add(0, tok, (gates[tok, e, None] * (h @ B[e].T)).to(x.dtype))   # (n_e, O)
    return scaling * y


# ----------------------------------------------------------------------------- timing


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(module: nn.Module, run, x, dy):
    """One forward + backward as a training step does it: grads reset to None (AdamW's
    zero_grad), a fixed random gradient dy for the output, and the balancing loss term when
    `run` returns one: run(x) -> (y, aux term or None)."""
    def step():
        x.grad = None
        for q in module.parameters():
            q.grad = None
        y, aux = run(x)
        outs, gouts = [y], [dy]
        if aux is not None:
            outs.append(aux)
            gouts.append(torch.ones_like(aux))
        torch.autograd.backward(outs, gouts)
    return step


def with_aux(layer: nn.Module, forward):
    """layer's forward (fused, naive or other) -> (y, aux_loss_coef * balancing loss or None)."""
    def run(x):
        y = forward(x)
        has_aux = getattr(layer, "aux", None) is not None and layer.aux_loss_coef > 0
        return y, layer.aux_loss_coef * layer.aux if has_aux else None
    return run


def round_robin(steps: dict) -> dict:
    """Median milliseconds of each step, timed in turn so that load changes hit all alike."""
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync()
            t0 = clock()
            step()
            sync()
            times[name].append(1e3 * (clock() - t0))
    return {name: statistics.median(ts) for name, ts in times.items()}


def grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm, which flop_counter does not know: 2 x rows x k x n for
    (rows, k) x (E, k, n); for the weight gradient (k, rows) x (rows, n) -> (E, k, n), the same."""
    if len(b_shape) == 3:
        return 2 * math.prod(out_shape) * a_shape[-1]
    return 2 * math.prod(out_shape) // out_shape[0] * a_shape[-1]


def saved_mib(run, x, exclude) -> float:
    """MiB that one forward keeps for its backward (activation memory, device-independent and
    exact): every storage that autograd saves, once; the parameters and x, which are there anyway,
    are not counted."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(x)
    return total / 2 ** 20


def gflop(step) -> float:
    """Matmul GFLOP of one call of `step` (forward and backward), by torch.utils.flop_counter."""
    has_grouped_mm = hasattr(torch.ops.aten, "_grouped_mm")
    custom = {torch.ops.aten._grouped_mm: grouped_mm_flop} if has_grouped_mm else {}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------- one adapted linear


def ratios(rows: list, E: int) -> dict:
    """Adapter-cost ratios: each method's paths against its fused path and the single LoRA, and
    each method against MoLoRA."""
    cost = {(row["method"], row["variant"]): row["adapter_ms"] for row in rows}
    lora = cost[("base", f"single LoRA r={E * r}")]
    out = {}
    for name in methods:
        fused = cost.get((name, "fused"))
        if fused is None:
            continue
        out[name] = {"fused/single_lora": fused / lora,
                     "naive_dense/fused": cost[(name, "naive dense")] / fused}
        if (name, "naive sparse") in cost:
            out[name]["naive_sparse/fused"] = cost[(name, "naive sparse")] / fused
        if (name, "grouped") in cost:
            out[name]["grouped/fused"] = cost[(name, "grouped")] / fused
        if (name, "fused compiled") in cost:
            out[name]["fused_compiled/single_lora"] = cost[(name, "fused compiled")] / lora
        if name != "molora" and ("molora", "fused") in cost:
            out[name]["fused/molora_fused"] = fused / cost[("molora", "fused")]
            out[name]["naive_dense/molora_naive_dense"] = (cost[(name, "naive dense")]
                                                           / cost[("molora", "naive dense")])
    return out


def check_paths(name: str, layer: nn.Module, dispatches: dict, x):
    """Every dispatch gives the fused update (before the base is added, so that bf16 rounding of
    base(x) + update does not hide it), or the bench stops: a fast wrong baseline would make every
    ratio meaningless. Reseeded before each, so dropout masks agree."""
    with torch.no_grad():
        updates = {}
        for path, dispatch in dispatches.items():
            torch.manual_seed(args.seed)
            xs = x.view(-1, SEQ, x.shape[-1]) if layer.sequence_input else x   # MoA: (N/SEQ, SEQ, I)
            updates[path] = layer.update(xs, dispatch).reshape(x.shape[0], -1).float()   # (N, O)
    scale = updates["fused"].abs().max().item()
    for path, update in updates.items():
        err = (update - updates["fused"]).abs().max().item() / scale
        if err > (1e-4 if dtype == torch.float32 else 3e-2):
            sys.exit(f"bench.py: {name} {path} differs from fused by {err:.1e} of the largest update")


def route_only(router: Router, coef: float):
    """The router's share of every routed layer: gates + balancing loss, no experts, no base."""
    def run(x):
        gates = router(x)                                          # (N, E)
        return gates, (coef * router.balance_loss if router.balance_loss is not None else None)
    return run


def bench_layer(E: int, D: int) -> dict:
    """Every row for one (E, D): ms, adapter ms, adapter GFLOP; then the ratios."""
    torch._dynamo.reset()                                          # new shapes: compile afresh
    base = nn.Linear(D, D).to(device, dtype).requires_grad_(False)
    x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)         # (N, I)
    dy = torch.randn(N, D, device=device, dtype=dtype)                             # (N, O) dL/dy
    dgates = torch.randn(N, E, device=device)                                      # (N, E), float32
    lora = LoRALinear(base, LoRAConfig(rank=E * r)).to(device, dtype)
    nn.init.normal_(lora.lora_B, std=0.02)
    router = Router(D, E, K).to(device, dtype)
    runs = {("base", "frozen base"): (base, lambda x: (base(x), None), dy),
            ("base", f"single LoRA r={E * r}"): (lora, lambda x: (lora(x), None), dy),
            ("base", "router"): (router, route_only(router, 0.01), dgates)}
    for name, (layer_cls, cfg_cls, make) in methods.items():
        try:
            layer = layer_cls(base, make(cfg_cls, E, r, K)).to(device, dtype)
        except ValueError as e:                                    # e.g. MALoRA's S > I
            notes.append(f"{name} at E={E}, D={D}: skipped ({e})")
            continue
        for n, q in layer.named_parameters():                      # not zero: B = 0 hides wrong maths
            if n.endswith("_B"):                                   # (MoDULA-Res: h = 0 as well)
                nn.init.normal_(q, std=0.02)
        dispatches = {"fused": dispatch_fused, "naive dense": dispatch_naive}
        if not layer.sequence_input:                               # MoA's fast path gathers, whatever
            dispatches["naive sparse"] = dispatch_sparse_loop      # the dispatch: no sparse loop row
        if K < E and name not in SOFT:                             # soft routing has nothing to skip
            dispatches["grouped"] = dispatch_grouped
        if args.compile:                                           # compiled in check_paths, once
            dispatches["fused compiled"] = dispatch_compiled
        check_paths(name, layer, dispatches, x)
        public = {"naive dense": layer.forward_naive}             # the layer's own loop
        for path, dispatch in dispatches.items():
            forward = public.get(path) or (lambda x, m=layer, d=dispatch: m._run(x, d))
            if layer.sequence_input:                               # MoA: N / SEQ sequences of SEQ
                forward = lambda x, f=forward: f(x.view(-1, SEQ, x.shape[-1])).flatten(0, 1)  # noqa: E731
            runs[(name, path)] = (layer, with_aux(layer, forward), dy)
    steps = {key: fwd_bwd(module, run, x, g) for key, (module, run, g) in runs.items()}
    ms = round_robin(steps)
    saved = {key: saved_mib(run, x, [x, *module.parameters(), *base.parameters()])
             for key, (module, run, _) in runs.items() if key[1] != "fused compiled"}
    flops = {key: gflop(step) for key, step in steps.items() if key[1] != "fused compiled"}
    for name, path in steps:                          # flop_counter and saved-tensor hooks cannot
        if path == "fused compiled":                  # look into a compiled graph: the fused maths
            flops[(name, path)], saved[(name, path)] = flops[(name, "fused")], saved[(name, "fused")]
    base_ms, base_gf, base_mib = (d[("base", "frozen base")] for d in (ms, flops, saved))
    rows = []
    for key in steps:
        alone = key[1] == "router"                                 # the router runs without the base
        rows.append({"method": key[0], "variant": key[1], "ms": ms[key],
                     "adapter_ms": ms[key] - (0 if alone else base_ms),
                     "adapter_gflop": flops[key] - (0 if alone else base_gf),
                     "adapter_saved_mib": saved[key] - (0 if alone else base_mib)})
    return {"E": E, "D": D, "N": N, "r": r, "K": K, "rows": rows, "ratios": ratios(rows, E)}


# ----------------------------------------------------------------------------- a whole train step


def train_step(model: nn.Module, opt, idx, targets):
    """forward, LM loss + balancing losses (train.py's loss), backward, AdamW step."""
    def step():
        logits = model(idx)                                                          # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + aux_loss(model)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt is not None:
            opt.step()
    return step


def bench_train_step(E: int) -> dict:
    """ms per step of the tiny GPT (train.py's default size, batch 64 x T 14): frozen (forward and
    backward through the frozen model, no adapter), single LoRA of rank E*r, each method fused and
    naive. Every model adapts q, k, v, o, up, down, so the methods differ only in their layers.
    Each model's embedding output requires grad, so backward always runs down to the input."""
    frozen = GPT(GPTConfig(vocab_size=32, block_size=14, n_layer=4, n_embd=128, n_head=4))
    frozen = frozen.to(device, dtype).requires_grad_(False)
    idx, targets = torch.randint(0, 32, (2, 64, 14), device=device)                  # (B, T) each

    def adapted(factory, naive=False):
        model = copy.deepcopy(frozen)
        layers = inject(model, lambda lin, _: factory(lin), ("q", "k", "v", "o", "up", "down"))
        for layer in layers if naive else ():
            layer.forward = layer.forward_naive                     # the loop in every layer
        return model.to(device, dtype)

    models = {"frozen": frozen,
              f"single LoRA r={E * r}": adapted(lambda lin: LoRALinear(lin, LoRAConfig(rank=E * r)))}
    for name, (layer_cls, cfg_cls, make) in methods.items():
        try:
            cfg = make(cfg_cls, E, r, K)
            models[f"{name} fused"] = adapted(lambda lin: layer_cls(lin, cfg))
            models[f"{name} naive dense"] = adapted(lambda lin: layer_cls(lin, cfg), naive=True)
        except ValueError as e:                                    # e.g. MALoRA's S > I
            notes.append(f"train step {name} at E={E}: skipped ({e})")
    steps = {}
    for label, model in models.items():
        model.wte.register_forward_hook(lambda m, i, out: out.requires_grad_())
        params = [q for q in model.parameters() if q.requires_grad]
        steps[label] = train_step(model.train(), torch.optim.AdamW(params) if params else None,
                                  idx, targets)
    ms = round_robin(steps)
    cost = {label: t - ms["frozen"] for label, t in ms.items()}
    rows = []
    for label, t in ms.items():
        if label == "frozen":
            continue
        method, _, path = label.partition(" ")                   # e.g. "mosld", "naive dense"
        same_path = cost.get(f"molora {path}") if method in methods else None
        rows.append({"model": label, "ms": t, "adapter_ms": cost[label],
                     "adapter/single_lora": cost[label] / cost[f"single LoRA r={E * r}"],
                     "adapter/molora_same_path": cost[label] / same_path if same_path else None})
    return {"E": E, "frozen_ms": ms["frozen"], "rows": rows}


# ----------------------------------------------------------------------------- run and print
load_before = os.getloadavg()
say(f"bench.py on {args.device} ({torch.get_num_threads()} threads, {args.clock} clock), "
    f"{args.dtype}, torch {torch.__version__}, load average {load_before[0]:.2f}; "
    f"N={N} r={r} top-{K}; adapter = layer - frozen base; ratios are of adapter costs; "
    f"freed memory {'kept (glibc mallopt)' if kept_memory else 'returned to the OS'}")
results = []
for D in dims:
    for E in experts:
        res = bench_layer(E, D)
        results.append(res)
        say(f"\nE={E} D={D}")
        say(f"  {'':11} {'variant':<22}{'ms':>9}{'adapter ms':>12}{'adapter GFLOP':>15}{'saved MiB':>11}")
        for row in res["rows"]:
            say(f"  {row['method']:11} {row['variant']:<22}{row['ms']:9.2f}"
                f"{row['adapter_ms']:12.2f}{row['adapter_gflop']:15.3f}{row['adapter_saved_mib']:11.2f}")
        for name, rat in res["ratios"].items():
            say(f"  {name:11} " + "  ".join(f"{k} {v:.2f}x" for k, v in rat.items()))
        if (args.device, args.dtype, N, D, E, r, K) == GOAL_SETTING:
            for name, key, sign, bound, source in GOALS:
                if key in res["ratios"].get(name, {}):
                    v = res["ratios"][name][key]
                    met = v <= bound if sign == "<=" else v >= bound
                    say(f"  goal {name} {key} {v:.2f}x {sign} {bound}x ({source}): "
                        f"{'met' if met else 'missed'}")

crossover = {}                                  # method, D -> smallest E where grouped beats fused
for res in results:
    for name, rat in res["ratios"].items():
        if rat.get("grouped/fused", math.inf) < 1:
            crossover.setdefault(f"{name} D={res['D']}", res["E"])
say("\ngrouped beats fused (adapter cost, this run) from: " +
    (", ".join(f"{k} E={E} (E/K={E / K:g})" for k, E in crossover.items()) or "never in this sweep"))

train = [bench_train_step(E) for E in experts] if args.train_step else []
for res in train:
    say(f"\ntrain step, tiny GPT (4 x 128, batch 64 x 14), E={res['E']}: "
        f"frozen forward + backward {res['frozen_ms']:.2f} ms")
    for row in res["rows"]:
        vs = row["adapter/molora_same_path"]
        say(f"  {row['model']:<25}{row['ms']:9.2f} ms {row['adapter_ms']:9.2f} adapter ms"
            f"{row['adapter/single_lora']:8.2f}x single LoRA" + (f"{vs:8.2f}x molora" if vs else ""))

load_after = os.getloadavg()
for note in notes:
    say(f"note: {note}")
say(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-minute)")
if args.json:
    print(json.dumps({"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "clock": args.clock, "torch": torch.__version__, "kept_freed_memory": kept_memory,
                      "load_average": [load_before[0], load_after[0]],
                      "layer": results, "grouped_from_E": crossover, "train_step": train,
                      "notes": notes}, indent=1))
