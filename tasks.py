"""Synthetic multi-task data that makes tasks interfere.

Every example is one fixed-length sequence:

    [TASK] d_1 ... d_L [SEP] a_1 ... a_L [EOS]        digits d, a in 0..9

The same digits d must map to a different answer a in every task, so one small adapter has to
hold several conflicting maps at once, keyed only by the task token:

    copy      a = d                       the "general" task: the base model is pretrained on it,
                                          and its accuracy after fine-tuning shows forgetting
    add1      a_i = (d_i + 1) mod 10      digit maps that conflict with each other
    subst     a_i = PERM[d_i]             (a fixed random permutation of the digits)
    neg       a_i = 9 - d_i
    mul3      a_i = 3 d_i mod 10
    addpos    a_i = (d_i + i) mod 10      the map depends on the position too

Two families of fine-tuning tasks (train.py --family), both with copy as the general task:

    maps      add1, subst, neg, mul3, addpos: one digit map each; the maps conflict on every digit
    shared    swap1 .. swap4: a_i = SWAP_t[9 - d_i], a skill every task needs and the base does not
              have (9 - d), then a map of the task's own that swaps two pairs of digits, so the
              tasks agree on six answers in ten: what a shared input side (MoSLD, MALoRA) or a
              universal expert (MoDULA) can share, beside a small map of each task's own

Splits: a fixed hash of an input's digits, mod 10, puts it in eval (0), validation (1) or train
(2-9), the same for every task, so no held-out input is ever trained on. Training data are drawn
fresh each step, or, with a finite training set (`train_pool`), from a fixed set of examples per
task, seen once per epoch. Accuracy is exact match of the L answer digits under greedy decoding;
per-digit accuracy, beside it, counts each answer digit alone.
"""
import torch

DIGITS = 10
SEP, EOS = 10, 11
GENERAL = "copy"
FAMILIES = {"maps": ("add1", "subst", "neg", "mul3", "addpos"),
            "shared": ("swap1", "swap2", "swap3", "swap4")}
TASKS = FAMILIES["maps"]                                       # the default fine-tuning tasks
ALL_TASKS = (GENERAL, *(t for family in FAMILIES.values() for t in family))
TASK_TOKEN = {name: 12 + i for i, name in enumerate(ALL_TASKS)}  # 12..21
SPLITS = {"eval": 0, "val": 1}                                 # hash mod 10; the rest is train
VOCAB_SIZE = 32                                                # room for more tasks
PERM = torch.tensor([3, 7, 0, 9, 4, 1, 8, 2, 6, 5])            # the "subst" map, fixed forever


ANSWER = {                                                      # d (B, L) -> a (B, L)
    "copy": lambda d: d,
    "add1": lambda d: (d + 1) % DIGITS,
    "subst": lambda d: PERM[d],
    "neg": lambda d: 9 - d,
    "mul3": lambda d: 3 * d % DIGITS,
    "addpos": lambda d: (d + torch.arange(1, d.shape[-1] + 1)) % DIGITS,
}
SWAPS = {"swap1": ((0, 1), (2, 3)), "swap2": ((4, 5), (6, 7)), "swap3": ((8, 9), (0, 2)),
         "swap4": ((1, 3), (5, 7))}                            # each task's two swapped pairs


def swap_map(pairs) -> torch.Tensor:
    """(10,) the digit permutation that exchanges each pair (a, b) and keeps the other digits."""
    m = torch.arange(DIGITS)
    for a, b in pairs:
        m[a], m[b] = b, a
    return m


ANSWER.update({name: lambda d, m=swap_map(pairs): m[9 - d] for name, pairs in SWAPS.items()})


def split_hash(d: torch.Tensor) -> torch.Tensor:
    """(B,) in 0..9: a fixed hash of the digits, the same for every task; 0 is eval, 1 validation."""
    weights = torch.tensor([1_000_003 ** i % 2_147_483_647 for i in range(d.shape[-1])])
    return (d * weights).sum(-1) % 2_147_483_647 % 10


def in_split(d: torch.Tensor, split: str) -> torch.Tensor:
    """(B,) bool: which inputs belong to the split ("train", "val" or "eval")."""
    h = split_hash(d)
    return h >= len(SPLITS) if split == "train" else h == SPLITS[split]


def sample_digits(n: int, L: int, split: str, gen: torch.Generator) -> torch.Tensor:
    """(n, L) random digits from one split (rejection sampling, CPU)."""
    if split not in (*SPLITS, "train"):
        raise ValueError(f"split {split!r}: choose one of train, {', '.join(SPLITS)}")
    rows = []
    while sum(r.shape[0] for r in rows) < n:
        d = torch.randint(0, DIGITS, (2 * n, L), generator=gen)            # (2n, L)
        rows.append(d[in_split(d, split)])
    return torch.cat(rows)[:n]                                             # (n, L)


def train_pool(names, n: int, L: int) -> dict:
    """A finite training set: task -> (n, L) fixed train-split inputs, the same in every run (a
    dataset, seeded by the task's token, not by the run's seed)."""
    return {t: sample_digits(n, L, "train", torch.Generator().manual_seed(TASK_TOKEN[t])) for t in names}


def make_batch(task_ids: torch.Tensor, L: int, split: str, gen: torch.Generator, pool: dict | None = None):
    """Sequences for the given task ids (B,), indices into ALL_TASKS; with a `pool` (train_pool),
    each task's inputs are drawn from its fixed set instead of fresh.

    Returns tokens (B, 2L+3) and the prompt length P = L+2 (task token, digits, SEP); the answer
    a_1..a_L, EOS occupies positions P..2L+2.
    """
    B = task_ids.shape[0]
    if pool is None:
        d = sample_digits(B, L, split, gen)                                # (B, L)
    else:
        d = torch.empty(B, L, dtype=torch.long)
        pick = torch.randint(0, 2 ** 62, (B,), generator=gen)              # (B,) one draw per row
        for t, name in enumerate(ALL_TASKS):
            rows = task_ids == t
            if rows.any():
                d[rows] = pool[name][pick[rows] % pool[name].shape[0]]
    a = torch.empty_like(d)
    for t, name in enumerate(ALL_TASKS):                                   # a handful of tasks
        rows = task_ids == t
        a[rows] = ANSWER[name](d[rows])
    task_tok = torch.tensor([TASK_TOKEN[n] for n in ALL_TASKS])[task_ids]  # (B,)
    tokens = torch.cat([task_tok[:, None], d, torch.full((B, 1), SEP), a,
                        torch.full((B, 1), EOS)], dim=1)                   # (B, 2L+3)
    return tokens, L + 2


def lm_inputs(tokens: torch.Tensor, P: int):
    """Next-token inputs (B, T) and targets (B, T), T = 2L+2, loss only on the answer and EOS."""
    x, y = tokens[:, :-1], tokens[:, 1:].clone()                           # (B, T), (B, T)
    y[:, :P - 1] = -100                                                    # no loss on the prompt
    return x, y


def task_ids_for(names, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) task ids drawn uniformly from the named tasks (a mixture batch)."""
    ids = torch.tensor([ALL_TASKS.index(t) for t in names])
    return ids[torch.randint(0, len(ids), (n,), generator=gen)]


@torch.no_grad()
def scores(model, task: str, n: int, L: int, seed: int = 1234, batch: int = 250, split: str = "eval") -> tuple:
    """(exact-match accuracy, per-digit accuracy) of greedy decoding on n held-out examples of one
    task (from the eval split, or "val"). Exact match needs all L answer digits right; per-digit
    counts each digit alone."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    exact = digits = 0
    for start in range(0, n, batch):
        m = min(batch, n - start)
        tokens, P = make_batch(torch.full((m,), ALL_TASKS.index(task)), L, split, gen)
        seq = tokens[:, :P].to(device)                                     # (m, P) the prompt
        for _ in range(L):                                                 # greedy, L digits
            logits = model(seq)
            logits = logits[0] if isinstance(logits, tuple) else logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        right = seq[:, P:].cpu() == tokens[:, P:P + L]                     # (m, L)
        exact += right.all(-1).sum().item()
        digits += right.sum().item()
    return exact / n, digits / (n * L)


def accuracy(model, task: str, n: int, L: int, seed: int = 1234, batch: int = 250) -> float:
    """Exact-match accuracy of greedy decoding on n held-out examples of one task."""
    return scores(model, task, n, L, seed, batch)[0]
