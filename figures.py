"""The figures of results/RESULTS.md, drawn from compare.py's summary of the runs.

    accuracy.png       mean task accuracy against trainable parameters, one line per method family
    tasks.png          accuracy per task as a heatmap, methods x tasks, the general task set apart
    usage-<run>.png    the expert usage of one routed run: tasks x experts, one panel per layer

matplotlib is an optional extra: it is imported inside the functions, and without it `draw_all`
returns one line saying that the figures were skipped. Every figure shares one style (`STYLE`,
`WIDTH`): 800 px wide, the width a rendered RESULTS.md shows, so that what is legible here is
legible there; and one colour per method (`method_color`), the same in every figure.
"""
import math
import os
import re
import statistics
from contextlib import contextmanager

REFERENCE = "LoRA"             # the curve every method is compared with
WIDTH, DPI = 8.0, 100          # inches, dots per inch: 800 px, as RESULTS.md shows an image
SMALL = 8                      # font size of the numbers in cells, panel titles and their ticks
STYLE = {"font.size": 10, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "figure.titlesize": 11, "axes.titlesize": SMALL, "axes.spines.top": False,
         "axes.spines.right": False, "figure.dpi": DPI, "savefig.dpi": DPI}
# Okabe-Ito colours (told apart with any colour vision), by the method a row's name starts with;
# the reference is black
METHOD_COLORS = {"LoRA": "#000000", "MoLoRA": "#0072B2", "MALoRA": "#D55E00", "MoSLD": "#009E73",
                 "MoSL": "#009E73", "MoDULA": "#CC79A7", "MoA": "#E69F00"}
OTHER_COLOR = "#777777"        # a method METHOD_COLORS does not name
MARKERS = "osD^vP"             # one per curve, so two curves of one method still differ
SKIPPED = "figures skipped: matplotlib is not installed (pip install matplotlib)"


def available() -> str | None:
    """None when matplotlib can be imported, else the one-line note that the figures are skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return SKIPPED
    return None


def method_color(name: str) -> str:
    """The colour of a row or curve: that of the method its name starts with ("MoLoRA top-2, rank 4"
    and "MoLoRA top-2" are both MoLoRA's)."""
    return METHOD_COLORS.get(re.match(r"[A-Za-z]*", name).group(), OTHER_COLOR)


@contextmanager
def new_figure(height: float, path: str):
    """A Figure of the house width and style, saved to path when the block ends. The Figure is
    built without pyplot: no global backend, nothing left open."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, height), layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        fig.savefig(path)


def mean_std(values) -> tuple:
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def short_count(n: float, _pos=None) -> str:
    """18432 -> '18k', 1200000 -> '1.2M': parameter counts as tick labels."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


# ----------------------------------------------------------------------------- accuracy


def place_labels(labels: list, obstacles: list, frame: tuple, pad: float, step: float = 3.0) -> list:
    """Where to write each label (px): as near its point as it can be without covering an obstacle
    or a label placed before it.

    labels: (x, y, w, h) per label, its point and its size; obstacles: (x0, x1, y0, y1); frame:
    the axes (x0, x1, y0, y1). A label tries right of its point (pad px away), then left of it,
    moved up or down by 0, step, 2 step, ..., and takes the first free place, or the place with
    the least overlap when none is free. Returns (side, dy) per label: side +1 right, -1 left."""
    def cover(box, taken):
        x0, x1, y0, y1 = box
        return sum(max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
                   for a0, a1, b0, b1 in taken)
    placed, out = [], []
    for x, y, w, h in labels:
        tries = []
        for k in range(int((frame[3] - frame[2]) / step) + 1):
            for side in (1, -1):
                for dy in (k * step, -k * step)[:1 + (k > 0)]:
                    x0 = x + pad if side > 0 else x - pad - w
                    box = (x0, x0 + w, y + dy - h / 2 - 1, y + dy + h / 2 + 1)
                    if frame[0] <= box[0] and box[1] <= frame[1] and frame[2] <= box[2] and box[3] <= frame[3]:
                        tries.append((cover(box, obstacles + placed), (side, dy), box))
        tries = tries or [(0.0, (1, 0.0), (x + pad, x + pad + w, y - h / 2, y + h / 2))]   # no room at all
        _, where, box = next((t for t in tries if t[0] == 0.0), None) or min(tries, key=lambda t: t[0])
        placed.append(box)
        out.append(where)
    return out


def accuracy_vs_params(S: dict, curves: dict, path: str, title: str, reference: str = REFERENCE) -> None:
    """Mean task accuracy against trainable parameters (log scale): one line per curve through its
    sizes, error bars the std over seeds, each curve named at its last point; the reference as a
    black dashed line. S: row -> per-seed dicts with "params" and "mean"; curves: label -> rows in
    increasing size (rows missing from S are skipped)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    points = {label: [(S[r][0]["params"], *mean_std(s["mean"] for s in S[r])) for r in rows if r in S]
              for label, rows in curves.items()}
    points = {label: p for label, p in points.items() if p}
    with new_figure(4.8, path) as fig:
        ax = fig.add_subplot()
        for i, (label, p) in enumerate(points.items()):
            x, y, err = zip(*p)
            ref = label == reference
            ax.errorbar(x, y, yerr=err, color="black" if ref else method_color(label),
                        ls="--" if ref else "-", marker=MARKERS[i % len(MARKERS)], ms=6, capsize=3,
                        lw=1.5, zorder=2 if ref else 3)
        xs = [x for p in points.values() for x, _, _ in p]
        ax.set_xscale("log")
        decades = math.log10(max(xs) / min(xs))
        ax.xaxis.set_major_locator(LogLocator(10, subs=(1, 2, 5) if decades < 3 else (1,)))
        ax.xaxis.set_major_formatter(FuncFormatter(short_count))
        ax.xaxis.set_minor_formatter(NullFormatter())                  # no crowded minor labels
        ax.set(xlabel="trainable parameters (log scale)", ylabel="mean task accuracy (%), ± std over seeds")
        fig.suptitle(title)
        ax.grid(True, which="major", alpha=0.3)
        label_curves(fig, ax, points, reference)


def drawn_boxes(points: dict, to_px) -> list:
    """What a curve's name must not cover, as (x0, x1, y0, y1) in px: every marker with its error
    bar, and every line between two markers as small boxes along it."""
    boxes = []
    for p in points.values():
        px = [(*to_px((x, y)), to_px((x, y + e))[1] - to_px((x, y))[1]) for x, y, e in p]
        boxes += [(x - 5, x + 5, y - max(e, 5), y + max(e, 5)) for x, y, e in px]
        for (x0, y0, _), (x1, y1, _) in zip(px, px[1:]):
            n = max(1, int(math.hypot(x1 - x0, y1 - y0) / 4))
            boxes += [(x0 + (x1 - x0) * k / n - 2, x0 + (x1 - x0) * k / n + 2,
                       y0 + (y1 - y0) * k / n - 2, y0 + (y1 - y0) * k / n + 2) for k in range(n + 1)]
    return boxes


def label_curves(fig, ax, points: dict, reference: str) -> None:
    """Each curve's name beside its last point, in its colour: the x axis is widened until every
    name fits right of its point inside the axes, then each name goes to the nearest place (right or
    left, up or down) where it covers no other, no marker, error bar or line; a name moved off its
    point gets a thin line to it."""
    fig.draw_without_rendering()                                        # the layout, then measure
    renderer, pad = fig.canvas.get_renderer(), 8                        # pad: px from the marker
    size = {}
    for label in points:
        probe = ax.text(0, 0, label)
        ext = probe.get_window_extent(renderer)
        size[label] = ext.width, ext.height
        probe.remove()
    width = ax.get_window_extent(renderer).width
    xs = [x for p in points.values() for x, _, _ in p]
    lo = min(xs) / 1.3
    span = math.log(max(xs) * 1.3 / lo)                                 # log of the x range
    for label, p in points.items():                                     # room for each name
        span = max(span, math.log(p[-1][0] / lo) / max(0.2, 1 - (size[label][0] + pad + 4) / width))
    ax.set_xlim(lo, lo * math.exp(span))
    fig.draw_without_rendering()
    box, to_px = ax.get_window_extent(renderer), ax.transData.transform
    ends = {label: to_px(p[-1][:2]) for label, p in points.items()}
    where = place_labels([(x, y, *size[label]) for label, (x, y) in ends.items()],
                         drawn_boxes(points, to_px), (box.x0, box.x1, box.y0, box.y1), pad)
    for label, (side, dy) in zip(points, where):
        color = "black" if label == reference else method_color(label)
        leader = dict(arrowstyle="-", lw=0.6, color=color, shrinkA=0, shrinkB=4)
        ax.annotate(label, points[label][-1][:2], xytext=(side * pad, dy), textcoords="offset pixels",
                    ha="left" if side > 0 else "right", va="center", color=color,
                    arrowprops=leader if abs(dy) > size[label][1] / 2 else None)


# ----------------------------------------------------------------------------- per task


def task_table(S: dict, rows: list, task_names: list, general: str, apart: tuple = ()) -> tuple:
    """tasks.png's numbers: (columns, their names, grid). columns: task_names, "mean", the tasks
    in `apart`, the general task, with None for the gap between two groups; grid (rows, columns),
    the mean over seeds of each row's accuracy (NaN in a gap). "mean" is the mean of task_names
    alone, from the per-task accuracies."""
    import numpy as np
    groups = [("", task_names), ("", ["mean"]), ("not in mean", list(apart)), ("general", [general])]
    value = {t: lambda s, t=t: s["acc"][t] for t in [*task_names, *apart]}
    value["mean"] = lambda s: statistics.mean(s["acc"][t] for t in task_names)
    value[general] = lambda s: s["general"]
    columns, names = [], []
    for group, cols in [(g, cols) for g, cols in groups if cols]:
        columns += [None] * bool(columns) + list(cols)
        names += [f"{c}\n({group})" if group else c for c in cols]
    grid = np.array([[np.nan if c is None else statistics.mean(value[c](s) for s in S[r])
                      for c in columns] for r in rows])                 # (rows, columns)
    return columns, names, grid


def task_heatmap(S: dict, rows: list, task_names: list, general: str, path: str, title: str,
                 apart: tuple = ()) -> None:
    """Methods (rows) x tasks, each cell the mean accuracy over seeds with its number. Columns: the
    tasks, their mean, then the tasks in `apart` (left out of the mean: no reference learns them),
    then the general task; a gap parts each group. The mean is that of task_names alone."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.transforms import offset_copy
    rows = [r for r in dict.fromkeys(rows) if r in S]
    columns, names, grid = task_table(S, rows, task_names, general, apart)
    edges = [0.0]                                          # cell edges: a gap is half a cell
    for c in columns:
        edges.append(edges[-1] + (1 if c else 0.5))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    with new_figure(1.6 + 0.3 * len(rows), path) as fig:
        ax = fig.add_subplot()
        image = ax.pcolormesh(edges, np.arange(len(rows) + 1), np.ma.masked_invalid(grid),
                              cmap=cmap, vmin=0, vmax=100)
        centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(columns))]
        for (i, j), v in np.ndenumerate(grid):
            if columns[j] is not None:
                dark = sum(w * ch for w, ch in zip((0.3, 0.59, 0.11), cmap(v / 100)[:3])) < 0.5
                ax.text(centres[j], i + 0.5, f"{v:.1f}", ha="center", va="center", fontsize=SMALL,
                        color="white" if dark else "black")
        ax.set_xticks([centres[j] for j, c in enumerate(columns) if c], names)
        ax.set_yticks(np.arange(len(rows)) + 0.5, rows)
        ax.set_ylim(len(rows), 0)                                       # first row on top
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        ax.tick_params(axis="y", pad=14)                                # room for the method's colour
        swatch = offset_copy(ax.get_yaxis_transform(), fig=fig, x=-7, units="dots")
        for i, r in enumerate(rows):
            ax.plot(0, i + 0.5, "s", ms=7, color=method_color(r), transform=swatch, clip_on=False)
        for side in ax.spines.values():
            side.set_visible(False)
        fig.suptitle(title)
        fig.colorbar(image, ax=ax, location="bottom", label="exact-match accuracy (%)", shrink=0.5,
                     aspect=40, pad=0.01)


# ----------------------------------------------------------------------------- expert usage


def split_layer(name: str) -> tuple:
    """'blocks.0.attn.q' -> ('0', 'attn.q'): the block (the first number in the name) and the
    linear in it; a name without a number is one block of its own."""
    parts = name.split(".")
    i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
    return ("", name) if i is None else (parts[i], ".".join(parts[i + 1:]))


def usage_heatmaps(record: dict, path: str, title: str) -> None:
    """One run's expert usage: per adapted layer a panel of tasks (rows) x experts (columns), each
    cell the task's mean gate on that expert (its share of the gate mass). Panels by block (rows)
    and linear (columns); one colour scale, 0 to 1, for every layer and every run."""
    import numpy as np
    usage = record["expert_usage"]
    blocks = list(dict.fromkeys(split_layer(n)[0] for n in usage))
    linears = list(dict.fromkeys(split_layer(n)[1] for n in usage))
    task_names = list(dict.fromkeys(t for per_task in usage.values() for t in per_task))
    E = max(len(g) for per_task in usage.values() for g in per_task.values())
    names = record.get("expert_names")
    experts = names if names and len(names) == E else [f"e{e}" for e in range(E)]
    column_px = (WIDTH * DPI - 160) / len(linears) / E      # 160 px: the task names and the colour bar
    vertical = 7 * max(map(len, experts)) > column_px      # 7 px: a character at font size 8
    height = len(blocks) * (0.5 + 0.16 * len(task_names)) + (0.9 if vertical else 0.5) + 0.4
    with new_figure(height, path) as fig:
        axes = fig.subplots(len(blocks), len(linears), squeeze=False, sharex=True, sharey=True)
        for ax in axes.flat:
            ax.set_visible(False)                                       # until a layer fills it
        for name, per_task in usage.items():
            b, lin = split_layer(name)
            ax = axes[blocks.index(b)][linears.index(lin)]
            ax.set_visible(True)
            grid = np.array([per_task.get(t, [np.nan] * E) for t in task_names])   # (tasks, E)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
            ax.set_title(f"block {b}, {lin}" if b else lin, pad=3)
            ax.tick_params(length=0, labelsize=SMALL)
            for side in ax.spines.values():                             # a light frame: white is 0
                side.set(visible=True, color="#bbbbbb", lw=0.6)
        for ax in axes[-1]:
            ax.set_xticks(range(E), experts, rotation=90 if vertical else 0)
        for ax in axes[:, 0]:
            ax.set_yticks(range(len(task_names)), task_names)
        fig.supxlabel("expert", fontsize="medium")
        fig.supylabel("task of the tokens", fontsize="medium")
        fig.suptitle(title)
        fig.colorbar(image, ax=axes, label="mean gate (share of the task's gate mass)",
                     shrink=0.9, aspect=30, ticks=[0, 0.25, 0.5, 0.75, 1])


# ----------------------------------------------------------------------------- all figures


def draw_all(S, curves, table_rows, task_names, general, records, out_dir, budget: str, apart=()) -> list[str]:
    """accuracy.png, tasks.png and usage-<run>.png (each routed run, seed 0) into out_dir; returns
    RESULTS.md's lines for them: the image and one sentence saying what to look at. Without
    matplotlib, only the note that the figures were skipped (nothing is written)."""
    if note := available():
        return [note]
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    if any(r in S for rows in curves.values() for r in rows):
        accuracy_vs_params(S, curves, os.path.join(out_dir, "accuracy.png"),
                           f"Mean task accuracy against trainable parameters ({budget})")
        ref = (f"; the dashed black line is {REFERENCE}, the reference every method is compared with"
               if REFERENCE in curves else "")
        lines.append("![accuracy against trainable parameters](accuracy.png)\n\nEach line is one method "
                     "at its sizes (mean ± std over seeds): higher is more accurate and further left is "
                     f"cheaper{ref}.")
    if any(r in S for r in table_rows):
        task_heatmap(S, table_rows, task_names, general, os.path.join(out_dir, "tasks.png"),
                     f"Accuracy per task, mean over seeds ({budget})", apart)
        lines.append(f"![accuracy per task](tasks.png)\n\nRead down a column to compare the methods on "
                     f"one task; the {general} column, set apart on the right, is the general task that no "
                     f"method trains on, so what a method keeps of it shows what it forgot.")
    routed = [r for r in records if r.get("expert_usage") and r["seed"] == 0]
    for r in routed:
        usage_heatmaps(r, os.path.join(out_dir, f"usage-{r['run']}.png"),
                       f"{r['row']}: mean gate of each expert on each task's tokens, seed 0 ({budget})")
    if routed:
        lines.append("Expert usage, one figure per routed method: a dark cell alone in its row is a task "
                     "routed to one expert; a row of even colour is a task the router spreads over every "
                     "expert.\n\n" + "\n\n".join(f"![expert usage of {r['row']}](usage-{r['run']}.png)"
                                                    for r in routed))
    return lines
