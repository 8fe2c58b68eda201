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
            "addpos": lambda x, i: (x + i) % 10}[task]
    return [rule(x, i) for i, x in enumerate(d, start=1)]


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
def test_eval_inputs_are_never_training_inputs(L):
    """Every digit length: make_batch's eval digits and train digits come from two disjoint sets,
    the eval one about a tenth of all inputs (all of them enumerated for L <= 4)."""
    gen = torch.Generator().manual_seed(L)
    ids = torch.zeros(400, dtype=torch.long)
    seen = {split: {tuple(r) for r in tasks.make_batch(ids, L, split, gen)[0][:, 1:L + 1].tolist()}
            for split in ("train", "eval")}
    assert seen["train"] and seen["eval"] and not seen["train"] & seen["eval"]
    if L <= 4:
        every = torch.tensor(list(itertools.product(range(10), repeat=L)))   # (10^L, L)
        split = tasks.in_eval_split(every)
        held_out = {tuple(r) for r in every[split].tolist()}
        assert seen["eval"] <= held_out and not seen["train"] & held_out
        assert 0.05 < split.float().mean() < 0.15 or L == 1       # L = 1: the digit 0 alone
        if L <= 2:                                                  # few inputs: all were drawn
            assert seen["eval"] == held_out and len(seen["train"]) == 10 ** L - len(held_out)


def test_the_split_does_not_depend_on_the_task():
    L, ids = 3, torch.arange(len(tasks.ALL_TASKS)).repeat(50)
    tokens, _ = tasks.make_batch(ids, L, "eval", torch.Generator().manual_seed(0))
    assert tasks.in_eval_split(tokens[:, 1:L + 1]).all()


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
    assert tasks.in_eval_split(prompts[:, 1:L + 1]).all()           # all held out
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
