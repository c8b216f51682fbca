"""The report of a grid: `ablation.md` (the paper's Tables 2-4: one table per schedule, rows
pooling x mask, scores x 100), `ablation.csv` (the same values unscaled, one row per cell) and
`ablation.png` (grouped bars; needs matplotlib) from every finished cell. The objective axis
shows (a column of both tables, part of each bar's label) when a finished cell has another
objective than the default one; a cell recorded without an objective has the default one.
Incomplete cells (a plan.json, no done.json: not run yet, stopped, failed) are listed under the
tables with the step and iteration they reached, and are rows of ablation.csv without scores,
with a `status` column that the CSV has only then.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from megatron_nvembed.ablation.cells import DONE_FILE, PLAN_FILE, SUMMARY, progress
from megatron_nvembed.ablation.grid import DEFAULT_OBJECTIVE, order_key
from megatron_nvembed.evaluation.mteb_eval import CATEGORIES  # the paper's column order
from megatron_nvembed.utils.fileio import write_atomic

# matplotlib is optional: the `ablate` extra of setup.py brings it (with mteb for the evaluations).
PLOT_SKIPPED_MESSAGE = (
    "ablation.png skipped: matplotlib is not installed (pip install -e '.[ablate]' adds it)"
)


def load_results(out: str | os.PathLike) -> list[dict]:
    """Every finished cell of `out`.

    Returns:
        Each cell's done.json with its evaluation summary.json under `eval`, in grid order
        (schedule, objective, pooling, mask); a done.json without `objective` (written before
        the axis existed) gets DEFAULT_OBJECTIVE.
    """
    rows = []
    for done_path in sorted(Path(out).glob(f"cells/*/{DONE_FILE}")):
        done = json.loads(done_path.read_text())
        summary = json.loads((done_path.parent / SUMMARY).read_text())
        rows.append({"objective": DEFAULT_OBJECTIVE, **done, "eval": summary})
    return sorted(rows, key=order_key)


def load_incomplete(out: str | os.PathLike) -> list[dict]:
    """Every cell of `out` with a plan.json and no done.json.

    Returns:
        Its settings (plan.json) and `progress` (`cells.progress`: the step, and iteration, it
        reached), in grid order.
    """
    rows = []
    for plan_path in sorted(Path(out).glob(f"cells/*/{PLAN_FILE}")):
        if (plan_path.parent / DONE_FILE).exists():
            continue
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being rewritten: the next collection lists it
        settings = {k: plan[k] for k in ("cell", "schedule", "pooling", "mask")}
        objective = plan.get("objective", DEFAULT_OBJECTIVE)
        rows.append({"objective": objective, **settings, "progress": progress(out, plan["cell"])})
    return sorted(rows, key=order_key)


def shows_objective(rows: list[dict]) -> bool:
    """Whether the report has an objective column: some row has a non-default objective (a grid
    that does not name the axis gets the same report as before the axis existed)."""
    return any(r.get("objective", DEFAULT_OBJECTIVE) != DEFAULT_OBJECTIVE for r in rows)


def table_columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The categories with at least one task in some cell (paper order), and the local BEIR sets."""
    cats = [
        c
        for c in CATEGORIES
        if any(r["eval"]["categories"].get(c, {}).get("num_tasks") for r in rows)
    ]
    beir = list(dict.fromkeys(b for r in rows for b in r.get("beir_sets", [])))
    return cats, beir


def _values(row: dict, cats: list[str], beir: list[str]) -> list[float | None]:
    ev = row["eval"]
    vals = [ev["categories"].get(c, {}).get("average") for c in cats]
    vals.append(ev["average"]["score"])
    vals += [ev["tasks"].get(b, {}).get("ndcg_at_10") for b in beir]
    return vals


def render_csv(rows: list[dict], incomplete: Sequence[dict] = ()) -> str:
    """`ablation.csv`: one row per cell, the summary.json values unscaled; with `incomplete`
    cells (`load_incomplete`) a `status` column ("done", "incomplete: <progress>") and their
    rows, unscored."""
    cats, beir = table_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    beir_cols = [f"ndcg_at_10:{b}" for b in beir]
    objective = ["objective"] if shows_objective([*rows, *incomplete]) else []
    status = ["status"] if incomplete else []
    head = ["cell", "schedule", "pooling", "mask", *objective, *status]
    w.writerow([*head, *cats, "Average", *beir_cols])
    for r in sorted([*rows, *incomplete], key=order_key):
        if "eval" in r:
            vals = ["" if v is None else repr(float(v)) for v in _values(r, cats, beir)]
        else:
            vals = [""] * (len(cats) + 1 + len(beir))
        settings = [r["schedule"], r["pooling"], r["mask"]]
        settings += [r.get("objective", DEFAULT_OBJECTIVE)] if objective else []
        settings += [f"incomplete: {r['progress']}" if "progress" in r else "done"] * len(status)
        w.writerow([r["cell"], *settings, *vals])
    return buf.getvalue()


def render_markdown(rows: list[dict], incomplete: Sequence[dict] = ()) -> str:
    """`ablation.md`: the paper's Tables 2-4 layout: one table per schedule, rows (objective x)
    pooling x mask, MTEB category columns (scores x 100), then nDCG@10 per local BEIR set; then
    the `incomplete` cells (`load_incomplete`), each with the step it reached."""
    cats, beir = table_columns(rows)
    objective = shows_objective(rows)
    title = "training schedule x objective" if objective else "training schedule"
    lines = [f"# Ablation: pooling x attention mask x {title}", ""]
    unfinished = ["", "## Incomplete cells (not in the tables)", ""]
    unfinished += [f"- {r['cell']}: {r['progress']}" for r in incomplete]
    if not rows:
        return "\n".join([*lines, "No finished cell yet.", *(unfinished if incomplete else []), ""])
    lines.append(
        "Scores x 100 from each cell's `eval/summary.json` (mteb main scores; category = mean of "
        "its tasks, Average = mean over all tasks of the seven categories)."
    )
    head = ["Objective"] if objective else []
    head += ["Pooling", "Mask", *[f"{c} ({_ntasks(rows, c)})" for c in cats], "Average"]
    head += [f"{b} nDCG@10" for b in beir]
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        lines += ["", f"## {schedule}", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            if r["schedule"] != schedule:
                continue
            vals = ["-" if v is None else f"{100 * v:.2f}" for v in _values(r, cats, beir)]
            settings = [r.get("objective", DEFAULT_OBJECTIVE)] if objective else []
            settings += [r["pooling"], r["mask"]]
            lines.append("| " + " | ".join([*settings, *vals]) + " |")
    return "\n".join([*lines, *(unfinished if incomplete else [])]) + "\n"


def _ntasks(rows: list[dict], cat: str) -> int:
    return max(r["eval"]["categories"].get(cat, {}).get("num_tasks", 0) for r in rows)


def plotting_available() -> bool:
    """Whether matplotlib can be imported (render_png needs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_png(rows: list[dict]) -> bytes:
    """`ablation.png`: grouped bars, one group per category (and Average), one bar per variant.

    Raises:
        ImportError: matplotlib is not installed (see plotting_available).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats, _ = table_columns(rows)
    cols = [*cats, "Average"]
    n = max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, len(cols) * (1.0 + 0.25 * n)), 4.5))
    width = 0.8 / max(1, len(rows))
    objective = shows_objective(rows)
    for i, r in enumerate(rows):
        vals = _values(r, cats, [])
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ys = [float("nan") if v is None else 100 * v for v in vals]
        label = f"{r['schedule']} / {r['pooling']} / {r['mask']}"
        if objective:
            label += f" / {r.get('objective', DEFAULT_OBJECTIVE)}"
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("score x 100")
    ax.set_title("Ablation: category scores per variant")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def collect(out: str | os.PathLike) -> list[dict]:
    """Writes OUT/ablation.md, OUT/ablation.csv and OUT/ablation.png (each atomically) from every
    finished cell (ablation.md and ablation.csv also list the incomplete ones). Without
    matplotlib the plot is skipped with a one-line message naming the extra to install, and an
    ablation.png of an earlier collection is removed (it would disagree with the new table).

    Returns:
        The rows (`load_results`).
    """
    out = Path(out)
    rows = load_results(out)
    incomplete = load_incomplete(out)
    write_atomic(out / "ablation.md", render_markdown(rows, incomplete))
    write_atomic(out / "ablation.csv", render_csv(rows, incomplete))
    if rows:
        if plotting_available():
            write_atomic(out / "ablation.png", render_png(rows))
        else:
            (out / "ablation.png").unlink(missing_ok=True)
            print(PLOT_SKIPPED_MESSAGE, flush=True)
    return rows
