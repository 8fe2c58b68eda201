"""figures.py: every figure from a small hand-made summary, the numbers of the task heatmap, the
placement of the curve names, and the note without matplotlib."""
import itertools
import sys

import pytest

import figures

TASKS, GENERAL, APART = ["add1", "subst", "neg"], "copy", ("addpos",)


def seeds(params, accs, general):
    """Two seeds of one row: accs = per-task accuracy of seed 0; seed 1 is 4 points lower."""
    return [{"params": params, "acc": {t: a - 4 * k for t, a in zip([*TASKS, *APART], accs)},
             "mean": -1.0, "general": general - k} for k in range(2)]   # "mean" must not be read


S = {"LoRA, rank 1": seeds(1_000, [50, 60, 70, 4], 90),
     "LoRA, rank 2": seeds(2_000, [60, 70, 80, 4], 85),
     "LoRA, rank 4": seeds(4_000, [70, 80, 90, 5], 80),
     "MoLoRA top-2, rank 1": seeds(9_000, [80, 90, 95, 10], 70),
     "MoLoRA top-2, rank 2": seeds(17_000, [90, 95, 99, 20], 60),
     "MALoRA, rank 1": seeds(8_500, [85, 92, 96, 30], 75)}
CURVES = {"LoRA": ["LoRA, rank 1", "LoRA, rank 2", "LoRA, rank 4"],
          "MoLoRA top-2": ["MoLoRA top-2, rank 1", "MoLoRA top-2, rank 2", "MoLoRA top-2, rank 4"],  # 4: no run
          "MALoRA": ["MALoRA, rank 1"]}
USAGE = {layer: {t: [0.7, 0.2, 0.1] if t == "add1" else [0.1, 0.3, 0.6] for t in [GENERAL, *TASKS]}
         for layer in ("blocks.0.attn.q", "blocks.1.attn.q")}
RECORDS = [{"run": "malora", "row": "MALoRA", "seed": 0, "expert_usage": USAGE,
            "expert_names": ["add1", "subst", "neg"]},
           {"run": "malora", "row": "MALoRA", "seed": 1, "expert_usage": USAGE, "expert_names": None},
           {"run": "lora-mix", "row": "LoRA, mixture", "seed": 0, "expert_usage": {}, "expert_names": None}]


def test_draw_all_writes_every_figure_and_links_it(tmp_path):
    pytest.importorskip("matplotlib")
    lines = figures.draw_all(S, CURVES, list(S), TASKS, GENERAL, RECORDS, str(tmp_path),
                             "300 steps, 2 seeds, rank 2", apart=APART)
    files = ["accuracy.png", "tasks.png", "usage-malora.png"]         # usage: routed runs, seed 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
    assert len(lines) == 3                                              # accuracy, tasks, usage
    for line, name in zip(lines[:2], files):
        image, sentence = line.split("\n\n")
        assert image.startswith("![") and image.endswith(f"]({name})")
        assert sentence.endswith(".") and ". " not in sentence          # one sentence
    sentence, *images = lines[2].split("\n\n")                         # one sentence for every usage figure
    assert sentence.endswith(".") and ". " not in sentence
    assert [i[i.index("](") + 2:-1] for i in images] == [f for f in files if f.startswith("usage-")]
    assert "LoRA" in lines[0].split("\n\n")[1]                          # names the reference


def test_usage_without_expert_names(tmp_path):
    pytest.importorskip("matplotlib")
    record = {**RECORDS[0], "expert_names": None, "expert_usage": {"lin": USAGE["blocks.0.attn.q"]}}
    figures.usage_heatmaps(record, str(tmp_path / "u.png"), "one layer without a block number")
    assert (tmp_path / "u.png").read_bytes().startswith(b"\x89PNG")


def test_task_table_numbers():
    np = pytest.importorskip("numpy")
    rows = ["MALoRA, rank 1", "LoRA, rank 1", "no such row"]
    columns, names, grid = figures.task_table(S, rows[:2], TASKS, GENERAL, APART)
    assert columns == [*TASKS, None, "mean", None, "addpos", None, "copy"]
    assert names == [*TASKS, "mean", "addpos\n(not in mean)", "copy\n(general)"]
    assert grid.shape == (2, len(columns))
    assert np.isnan(grid[:, [3, 5, 7]]).all()                           # the gaps
    np.testing.assert_allclose(grid[0, :3], [83, 90, 94])               # mean over the two seeds
    np.testing.assert_allclose(grid[1, 4], (50 + 60 + 70) / 3 - 2)      # of TASKS alone, not addpos
    np.testing.assert_allclose(grid[:, 6], [28, 2])                    # addpos apart
    np.testing.assert_allclose(grid[:, 8], [74.5, 89.5])                # general
    columns, _, _ = figures.task_table(S, rows[:1], TASKS, GENERAL)
    assert columns == [*TASKS, None, "mean", None, "copy"]              # no gap for an empty group


def test_place_labels_overlap_nothing():
    """Four labels wanted at one point beside a wall of obstacles: each gets a free place, none
    covers another or an obstacle, and all stay in the frame."""
    frame = (0, 400, 0, 300)
    wall = [(220, 230, 0, 300), (60, 70, 85, 95)]                     # an error bar, a marker
    labels = [(200, 60, 150, 12)] * 4                                  # (x, y, w, h)
    where = figures.place_labels(labels, wall, frame, pad=8)
    boxes = []
    for (x, y, w, h), (side, dy) in zip(labels, where):
        x0 = x + 8 if side > 0 else x - 8 - w
        boxes.append((x0, x0 + w, y + dy - h / 2, y + dy + h / 2))
    disjoint = lambda a, b: a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
    for a, b in itertools.combinations(boxes, 2):
        assert disjoint(a, b)
    for a in boxes:
        assert all(disjoint(a, o) for o in wall)
        assert frame[0] <= a[0] and a[1] <= frame[1] and frame[2] <= a[2] and a[3] <= frame[3]
    assert where[0] == (-1, 0.0)                                       # right is walled off: left, level


def test_names_and_colours():
    assert figures.split_layer("blocks.0.attn.q") == ("0", "attn.q")
    assert figures.split_layer("model.layers.11.self_attn.q_proj") == ("11", "self_attn.q_proj")
    assert figures.split_layer("lin") == ("", "lin")
    assert [figures.short_count(n) for n in (500, 20_000, 18_432, 1_000_000, 2.5e6)] == \
        ["500", "20k", "18.4k", "1M", "2.5M"]
    assert figures.method_color("MoLoRA top-2, rank 4") == figures.method_color("MoLoRA top-2")
    assert figures.method_color("MoSL p=0") == figures.method_color("MoSLD p=0.1")
    methods = ["LoRA", "MoLoRA", "MALoRA", "MoSLD", "MoDULA-Res", "MoA-style", "something else"]
    assert len({figures.method_color(m) for m in methods}) == len(methods)


def test_without_matplotlib_one_note_and_no_file(tmp_path, monkeypatch):
    for name in ["matplotlib", *[m for m in sys.modules if m.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)                    # importing it fails
    out = tmp_path / "results"
    lines = figures.draw_all(S, CURVES, list(S), TASKS, GENERAL, RECORDS, str(out), "budget", APART)
    assert lines == [figures.available()]
    assert lines[0] == "figures skipped: matplotlib is not installed (pip install matplotlib)"
    assert not out.exists()
