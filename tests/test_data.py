"""tasks.py pinned: each task's answer on examples written out by hand, the sequence layout, the
held-out split (no eval input is ever a training input, for every digit length), the LM targets
(exactly the answer digits and [EOS]), and the exact-match metric (one wrong digit, the last
included, makes the example wrong), measured through a scripted model that reads what it is asked."""
import itertools

import pytest
import torch
import torch.nn as nn

import tasks

HAND = {  # task: (digits, answer), worked out by hand from the definitions in tasks.py
    "copy": ([0, 9, 5, 3], [0, 9, 5, 3]),
    "add1": ([0, 9, 5, 3], [1, 0, 6, 4]),                     # (d + 1) mod 10
    "subst": ([0, 9, 5, 3], [3, 5, 1, 9]),                    # PERM = 3 7 0 9 4 1 8 2 6 5
    "neg": ([0, 9, 5, 3], [9, 0, 4, 6]),                      # 9 - d
    "mul3": ([0, 9, 5, 4], [0, 7, 5, 2]),                     # 3 d mod 10
    "addpos": ([0, 9, 5, 8], [1, 1, 8, 2]),                   # (d_i + i) mod 10, i = 1..L
    "swap1": ([0, 6, 7, 8], [9, 2, 3, 0]),                    # 9 - d, then 0<->1, 2<->3
    "swap2": ([2, 4, 5, 0], [6, 4, 5, 9]),                    # 9 - d, then 4<->5, 6<->7
    "swap3": ([0, 1, 7, 9], [8, 9, 0, 2]),                    # 9 - d, then 8<->9, 0<->2
    "swap4": ([2, 4, 6, 8], [5, 7, 1, 3]),                    # 9 - d, then 1<->3, 5<->7
}


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
def test_each_answer_matches_its_hand_worked_example(task):
    d, a = HAND[task]
    assert tasks.ANSWER[task](torch.tensor([d])).tolist() == [a]


def test_subst_is_a_permutation_and_tasks_conflict():
    assert sorted(tasks.PERM.tolist()) == list(range(10))
    d = torch.arange(10)[None]
    answers = {t: tuple(tasks.ANSWER[t](d)[0].tolist()) for t in tasks.ALL_TASKS}
    assert len(set(answers.values())) == len(tasks.ALL_TASKS)  # no two tasks give the same map


def hand_answer(task, d):
    """Each task's definition, one digit at a time (positions i = 1..L)."""
    perm = [3, 7, 0, 9, 4, 1, 8, 2, 6, 5]
    rule = {"copy": lambda x, i: x, "add1": lambda x, i: (x + 1) % 10, "subst": lambda x, i: perm[x],
            "neg": lambda x, i: 9 - x, "mul3": lambda x, i: 3 * x % 10,
            "addpos": lambda x, i: (x + i) % 10,                    # 9 - x, then two swapped pairs:
            **{t: lambda x, i, m=m: m[x] for t, m in SWAP_BY_HAND.items()}}[task]
    return [rule(x, i) for i, x in enumerate(d, start=1)]


SWAP_BY_HAND = {"swap1": [9, 8, 7, 6, 5, 4, 2, 3, 0, 1], "swap2": [9, 8, 6, 7, 4, 5, 3, 2, 1, 0],
                "swap3": [8, 9, 7, 6, 5, 4, 3, 0, 1, 2], "swap4": [9, 8, 5, 6, 7, 4, 1, 2, 3, 0]}


def test_shared_family_agrees_with_neg_on_six_digits_in_ten():
    """The shared skill is 9 - d: each swap task gives it on six digits, its own answer on four,
    and no two tasks share all four."""
    neg = [9 - x for x in range(10)]
    own = {t: {x for x in range(10) if m[x] != neg[x]} for t, m in SWAP_BY_HAND.items()}
    assert all(len(v) == 4 for v in own.values()) and len({frozenset(v) for v in own.values()}) == 4


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
def test_sequence_layout(task):
    """[TASK] d_1 .. d_L [SEP] a_1 .. a_L [EOS], with P = L + 2 the prompt length."""
    L = 4
    gen = torch.Generator().manual_seed(0)
    tokens, P = tasks.make_batch(torch.full((6,), tasks.ALL_TASKS.index(task)), L, "train", gen)
    assert tokens.shape == (6, 2 * L + 3) and P == L + 2
    assert (tokens[:, 0] == tasks.TASK_TOKEN[task]).all()
    assert (tokens[:, L + 1] == tasks.SEP).all() and (tokens[:, -1] == tasks.EOS).all()
    d, a = tokens[:, 1:L + 1], tokens[:, P:P + L]
    for row_d, row_a in zip(d.tolist(), a.tolist()):
        assert row_a == hand_answer(task, row_d)


def test_mixed_batches_answer_each_row_by_its_own_task():
    L, gen = 3, torch.Generator().manual_seed(1)
    ids = torch.arange(len(tasks.ALL_TASKS)).repeat(4)
    tokens, P = tasks.make_batch(ids, L, "train", gen)
    for row, t in zip(tokens.tolist(), ids.tolist()):
        name = tasks.ALL_TASKS[t]
        assert row[0] == tasks.TASK_TOKEN[name] and row[P:P + L] == hand_answer(name, row[1:L + 1])


# ----------------------------------------------------------------------------- held-out split


@pytest.mark.parametrize("L", [1, 2, 3, 4, 6])
def test_held_out_inputs_are_never_training_inputs(L):
    """Every digit length: make_batch's train, validation and eval digits come from three disjoint
    sets, validation and eval each about a tenth of all inputs (all enumerated for L <= 4)."""
    gen = torch.Generator().manual_seed(L)
    ids = torch.zeros(400, dtype=torch.long)
    seen = {split: {tuple(r) for r in tasks.make_batch(ids, L, split, gen)[0][:, 1:L + 1].tolist()}
            for split in ("train", "val", "eval")}
    assert all(seen.values())
    assert not seen["train"] & seen["eval"] and not seen["train"] & seen["val"] and not seen["val"] & seen["eval"]
    if L <= 4:
        every = torch.tensor(list(itertools.product(range(10), repeat=L)))   # (10^L, L)
        for name in ("val", "eval"):
            split = tasks.in_split(every, name)
            held_out = {tuple(r) for r in every[split].tolist()}
            assert seen[name] <= held_out and not seen["train"] & held_out
            assert 0.05 < split.float().mean() < 0.15 or L == 1   # L = 1: one digit each
            if L <= 2:                                              # few inputs: all were drawn
                assert seen[name] == held_out
        if L <= 2:
            assert len(seen["train"]) == 10 ** L - len(seen["val"]) - len(seen["eval"])
    with pytest.raises(ValueError, match="split 'test'"):
        tasks.sample_digits(4, L, "test", gen)


def test_finite_training_set_is_fixed_per_task_and_drawn_from_train():
    """train_pool: the same inputs in every run (seeded by the task, not the run), from the train
    split; make_batch with it draws each row from its own task's set, in an order set by `gen`."""
    L, names = 3, ("add1", "swap2")
    pool = tasks.train_pool(names, 50, L)
    assert all(torch.equal(pool[t], tasks.train_pool(names, 50, L)[t]) for t in names)
    assert not torch.equal(pool["add1"], pool["swap2"])
    assert all(tasks.in_split(pool[t], "train").all() for t in names)
    ids = torch.tensor([tasks.ALL_TASKS.index(t) for t in names]).repeat(300)
    tokens, P = tasks.make_batch(ids, L, "train", torch.Generator().manual_seed(0), pool)
    for i, t in enumerate(names):
        rows = {tuple(r) for r in tokens[ids == tasks.ALL_TASKS.index(t), 1:L + 1].tolist()}
        assert rows <= {tuple(r) for r in pool[t].tolist()} and len(rows) > 40   # most of its 50 seen
        assert torch.equal(tokens[ids == tasks.ALL_TASKS.index(t), P:P + L],
                           tasks.ANSWER[t](tokens[ids == tasks.ALL_TASKS.index(t), 1:L + 1]))
    again, _ = tasks.make_batch(ids, L, "train", torch.Generator().manual_seed(0), pool)
    other, _ = tasks.make_batch(ids, L, "train", torch.Generator().manual_seed(1), pool)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)


def test_the_split_does_not_depend_on_the_task():
    L, ids = 3, torch.arange(len(tasks.ALL_TASKS)).repeat(50)
    tokens, _ = tasks.make_batch(ids, L, "eval", torch.Generator().manual_seed(0))
    assert tasks.in_split(tokens[:, 1:L + 1], "eval").all()


# ----------------------------------------------------------------------------- LM targets


def test_lm_targets_are_exactly_the_answer_digits_and_eos():
    L = 3
    tokens, P = tasks.make_batch(torch.arange(6), L, "train", torch.Generator().manual_seed(0))
    x, y = tasks.lm_inputs(tokens, P)
    assert torch.equal(x, tokens[:, :-1])                           # inputs: every token but [EOS]
    scored = y != -100
    assert scored.sum(1).tolist() == [L + 1] * 6
    assert torch.equal(scored[0], torch.arange(2 * L + 2) >= P - 1)   # from the position before a_1
    assert torch.equal(y[scored].view(6, L + 1), tokens[:, P:])      # a_1 .. a_L, [EOS]


# ----------------------------------------------------------------------------- exact match


class Scripted(nn.Module):
    """A 'model' that answers each prompt from its own copy of the task definitions, with the
    digit at answer position `wrong_at` changed on the rows where `wrong_rows(digits)` holds. It
    records every prompt it is asked, so the test sees which inputs the metric evaluates."""

    def __init__(self, L, wrong_at=None, wrong_rows=lambda d: torch.ones(d.shape[0], dtype=torch.bool)):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))                   # accuracy() reads the device
        self.L, self.wrong_at, self.wrong_rows, self.prompts = L, wrong_at, wrong_rows, []

    def forward(self, seq):                                         # (m, t) -> (m, t, V)
        L, t = self.L, seq.shape[1]
        P = L + 2
        if t == P:
            self.prompts.append(seq.clone())
        d = seq[:, 1:L + 1]
        names = [next(n for n, tok in tasks.TASK_TOKEN.items() if tok == k) for k in seq[:, 0].tolist()]
        a = torch.tensor([hand_answer(n, r) for n, r in zip(names, d.tolist())])   # (m, L)
        nxt = a[:, t - P] if t - P < L else torch.full((seq.shape[0],), tasks.EOS)
        if self.wrong_at == t - P:
            nxt = torch.where(self.wrong_rows(d), (nxt + 1) % 10, nxt)
        logits = torch.zeros(seq.shape[0], t, tasks.VOCAB_SIZE)
        logits[torch.arange(seq.shape[0]), -1, nxt] = 1.0
        return logits


@pytest.mark.parametrize("task", ["add1", "addpos"])
def test_exact_match_counts_any_wrong_digit(task):
    L, n = 3, 40
    right = Scripted(L)
    assert tasks.accuracy(right, task, n, L, batch=16) == 1.0
    prompts = torch.cat(right.prompts)
    assert prompts.shape == (n, L + 2)                              # n prompts, each asked once
    assert tasks.in_split(prompts[:, 1:L + 1], "eval").all()        # all held out
    for i in range(L):                                              # first, middle and last digit
        assert tasks.accuracy(Scripted(L, wrong_at=i), task, n, L, batch=16) == 0.0
    half = Scripted(L, wrong_at=L - 1, wrong_rows=lambda d: d[:, 0] < 5)
    expect = (prompts[:, 1] >= 5).float().mean().item()             # same seed, same prompts
    assert tasks.accuracy(half, task, n, L, batch=16) == pytest.approx(expect)


def test_per_digit_accuracy_counts_each_answer_digit_alone():
    """tasks.scores: exact match needs every digit; per-digit counts right digits over n * L, so
    one wrong digit on every row gives (L - 1) / L, and on half the rows 1 - 1 / (2 L)."""
    L, n = 3, 40
    assert tasks.scores(Scripted(L), "neg", n, L, batch=16) == (1.0, 1.0)
    assert tasks.scores(Scripted(L, wrong_at=1), "neg", n, L, batch=16) == (0.0, pytest.approx(2 / 3))
    half = Scripted(L, wrong_at=0, wrong_rows=lambda d: d[:, 0] < 5)
    exact, digit = tasks.scores(half, "neg", n, L, batch=16)
    assert digit == pytest.approx(1 - (1 - exact) / L)               # each wrong row loses one digit
