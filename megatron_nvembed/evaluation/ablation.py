"""Ablation grid (NV-Embed paper Tables 2-4): pooling x attention mask x training schedule.

Each cell imports (or reuses) a base checkpoint with its pooling and mask, trains it with
`examples/pretrain_nvembed.sh` under its schedule and evaluates the final checkpoint with
`tools/evaluate_mteb.py`. `tools/ablate.py` is the command line; this module holds the plan (the
exact commands of every step), the local runner, the SLURM script writer and the collection of
results into `ablation.md` / `ablation.csv` / `ablation.png`.

Layout of `OUT`:
```
OUT/
  bases/<pooling>_<mask>/      shared imported base checkpoints (import-hf, or a mask variant)
  cells/<cell>/
    plan.json                  the cell's settings and the commands of its steps
    steps/<step>.done          a finished step (skipped when the grid is run again)
    logs/<step>.log            each step's output
    stage1/ stage2/ | train/   training checkpoints (--save, --load: an interrupted run resumes)
    eval/                      tools/evaluate_mteb.py output (summary.json, summary.md, results/)
    done.json                  written atomically last; a cell with it is never run again
  slurm/                       --run slurm: bases.sbatch, <cell>.sbatch, submit_all.sh
  ablation.md ablation.csv ablation.png
```
Schedules: `two-stage` (stage 1 on the stage-1 data, then stage 2 on the stage-2 data from its
weights), `single-stage-inbatch` (the stage-1 recipe on all data) and `single-stage-no-inbatch`
(the same with `--no-in-batch-negatives`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_nvembed.evaluation.mteb_eval import CATEGORIES  # the paper's column order
from megatron_nvembed.fileio import write_atomic

ROOT = Path(__file__).resolve().parents[2]
POOLINGS = ("eos", "mean", "latent", "self-attention")
MASKS = ("bidirectional", "causal")
SCHEDULES = ("two-stage", "single-stage-inbatch", "single-stage-no-inbatch")
AXES = {"pooling": POOLINGS, "mask": MASKS, "schedule": SCHEDULES}

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "nvembed_config.json"


# ----------------------------------------------------------------------------------- the grid


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`["pooling=mean,latent", "mask=causal"]` -> every axis with its selected values (an axis
    not named keeps all of its values), in the canonical order of each axis.

    Raises:
        ValueError: naming `--grid` on an unknown axis, an unknown value, or an axis given twice.
    """
    grid = {axis: list(values) for axis, values in AXES.items()}
    seen = set()
    for spec in specs:
        axis, sep, values = spec.partition("=")
        if not sep or axis not in AXES:
            raise ValueError(f"--grid {spec!r}: expected AXIS=V1,V2 with AXIS in {sorted(AXES)}")
        if axis in seen:
            raise ValueError(f"--grid: axis {axis!r} given twice")
        seen.add(axis)
        chosen = [v for v in values.split(",") if v]
        bad = [v for v in chosen if v not in AXES[axis]]
        if bad or not chosen:
            raise ValueError(f"--grid {spec!r}: {axis} must be among {list(AXES[axis])}")
        grid[axis] = [v for v in AXES[axis] if v in chosen]
    return grid


def cell_name(schedule: str, pooling: str, mask: str) -> str:
    return f"{schedule}_{pooling}_{mask}"


def base_name(pooling: str, mask: str) -> str:
    return f"{pooling}_{mask}"


# ------------------------------------------------------------------------------ schedule flags


def _flag_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def combine_data(stage1: list[str], stage2: list[str]) -> list[str]:
    """`--train-data` of the single-stage schedules: every dataset of both stages. Paths only on
    both sides: the union of the paths (equal weights). Otherwise each side's weights are
    rescaled to sum to its number of datasets (a dataset weighs 1 on average, as in an unweighted
    list) and the pairs are concatenated."""
    from megatron_nvembed.data.loading import parse_data_paths

    def weighted(tokens: list[str]) -> bool:
        try:
            float(tokens[0])
        except (ValueError, IndexError):
            return False
        return True

    if not stage2:
        return list(stage1)
    if not (weighted(stage1) or weighted(stage2)):
        return list(dict.fromkeys([*stage1, *stage2]))
    out: list[str] = []
    for tokens in (stage1, stage2):
        pairs = parse_data_paths(list(tokens))
        total = sum(w for w, _ in pairs)
        out += [t for w, p in pairs for t in (_flag_value(w * len(pairs) / total), p)]
    return out


def _absolute_data(tokens: list[str]) -> list[str]:
    """Data paths made absolute (the steps run from the repository root); weights and names
    that are not local paths (`datasets` hub names) are kept."""
    out = []
    for t in tokens:
        try:
            float(t)
            out.append(t)
        except ValueError:
            out.append(str(Path(t).resolve()) if Path(t).exists() else t)
    return out


# ------------------------------------------------------------------------------------- the plan


@dataclass
class Step:
    """One command of a cell (or of a base): `kind` is import / derive / train / eval."""

    name: str
    kind: str
    argv: list[str]
    output: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    out: Path
    recipe: str
    nproc: int
    bases: dict[str, list[Step]]  # base name -> steps making it (empty: given checkpoint)
    base_paths: dict[str, str]
    cells: dict[str, dict]  # cell name -> {"pooling", "mask", "schedule", "base", "steps", ...}


def _py() -> str:
    return sys.executable


def _script(name: str) -> str:
    return str(ROOT / name)


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    root = Path(path)
    it = int((root / TRACKER).read_text().strip())
    return json.loads((root / f"iter_{it:07d}" / CONFIG_FILE).read_text())


def derive_mask_variant(src: str | os.PathLike, dst: str | os.PathLike, mask: str) -> None:
    """Writes checkpoint `dst` = checkpoint `src` with attention mask `mask`: the weights are the
    same (files hard-linked where possible, else copied) and every iteration's model config says
    `mask_type: mask`, exactly what `import-hf --mask-type` would have written. Atomic (a
    temporary sibling renamed into place)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    src, dst = Path(src), Path(dst)
    if not (src / TRACKER).is_file():
        raise FileNotFoundError(f"{src}: not a megatron_nvembed checkpoint (no {TRACKER})")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link_or_copy)
    for cfg_path in tmp.glob(f"iter_*/{CONFIG_FILE}"):
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["mask_type"] = mask
        cfg_path.unlink()  # a hard link: never write through it into `src`
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def build_plan(
    *,
    out: str | os.PathLike,
    grid: dict[str, list[str]],
    recipe: str,
    stage1_data: list[str],
    stage2_data: list[str],
    base_hf: str | None = None,
    base_checkpoint: str | None = None,
    eval_beir: list[str] = (),
    tasks: list[str] = (),
    instruction: str | None = None,
    nproc: int = 1,
    extra: list[str] = (),
) -> Plan:
    """Every command of every base and cell of `grid`.

    Raises:
        ValueError: naming the flag (missing data for a schedule, a base checkpoint whose pooling
            differs from a selected pooling, nothing to evaluate, ...).
    """
    out = Path(out).resolve()
    if (base_hf is None) == (base_checkpoint is None):
        raise ValueError("give exactly one of --base-hf and --base-checkpoint")
    if base_hf is not None and not (Path(base_hf) / "config.json").is_file():
        raise ValueError(f"--base-hf {base_hf}: no config.json (not a transformers model folder)")
    if base_checkpoint is not None and not (Path(base_checkpoint) / TRACKER).is_file():
        raise ValueError(f"--base-checkpoint {base_checkpoint}: no {TRACKER} (not a checkpoint)")
    if not stage1_data:
        raise ValueError("--stage1-data is required")
    if "two-stage" in grid["schedule"] and not stage2_data:
        raise ValueError("schedule two-stage needs --stage2-data")
    if not (eval_beir or tasks):
        raise ValueError("nothing to evaluate: give --eval-beir and/or --tasks")
    recipe = recipe.removesuffix("_stage1").removesuffix("_stage2")
    from megatron_nvembed.training.recipes import get_recipe

    get_recipe(recipe, 1)  # unknown recipe -> ValueError naming --recipe
    stage1_data, stage2_data = _absolute_data(stage1_data), _absolute_data(stage2_data)
    all_data = combine_data(stage1_data, stage2_data)

    bases: dict[str, list[Step]] = {}
    base_paths: dict[str, str] = {}
    if base_checkpoint is not None:
        src_cfg = read_checkpoint_config(base_checkpoint)
        have = src_cfg["pooling"]["type"]
        wrong = [p for p in grid["pooling"] if p != have]
        if wrong:
            raise ValueError(
                f"--base-checkpoint {base_checkpoint} has {have!r} pooling; pooling {wrong} "
                "needs a new head: use --base-hf, or --grid pooling=" + have
            )
    for pooling in grid["pooling"]:
        first = None
        for mask in grid["mask"]:
            name = base_name(pooling, mask)
            path = out / "bases" / name
            if base_checkpoint is not None and src_cfg["model"]["mask_type"] == mask:
                base_paths[name] = str(Path(base_checkpoint).resolve())
                bases[name] = []
                continue
            base_paths[name] = str(path)
            if base_checkpoint is not None:
                src = str(Path(base_checkpoint).resolve())
            elif first is None:
                first = str(path)
                argv = [_py(), _script("tools/convert_checkpoint.py"), "import-hf"]
                argv += ["--hf-dir", str(Path(base_hf).resolve()), "--save", str(path)]
                argv += ["--pooling", pooling, "--mask-type", mask]
                bases[name] = [Step(f"import_{name}", "import", argv, str(path))]
                continue
            else:
                src = first
            argv = [_py(), _script("tools/ablate.py"), "--derive-mask", src, str(path), mask]
            deps = [] if base_checkpoint is not None else bases[base_name(pooling, grid["mask"][0])]
            bases[name] = [*deps, Step(f"derive_{name}", "derive", argv, str(path))]

    cells = {}
    launcher = ["bash", _script("examples/pretrain_nvembed.sh")]
    for schedule in grid["schedule"]:
        for pooling in grid["pooling"]:
            for mask in grid["mask"]:
                name = cell_name(schedule, pooling, mask)
                cdir = out / "cells" / name
                base = base_paths[base_name(pooling, mask)]

                def train(step, stage, init, data, flags=(), cdir=cdir):
                    save = str(cdir / step)
                    argv = [*launcher, "--recipe", recipe, "--stage", str(stage), *flags]
                    argv += ["--pretrained-checkpoint", init, "--train-data", *data]
                    argv += ["--save", save, "--load", save, "--log-json", f"{save}/log.jsonl"]
                    return Step(step, "train", [*argv, *extra], save)

                if schedule == "two-stage":
                    steps = [
                        train("stage1", 1, base, list(stage1_data)),
                        train("stage2", 2, str(cdir / "stage1"), list(stage2_data)),
                    ]
                elif schedule == "single-stage-inbatch":
                    steps = [train("train", 1, base, all_data)]
                else:
                    steps = [train("train", 1, base, all_data, ["--no-in-batch-negatives"])]
                final = steps[-1].output
                ev = [_py(), _script("tools/evaluate_mteb.py"), "--model", final]
                ev += ["--output", str(cdir / "eval"), "--resume", "--name", f"ablation/{name}"]
                if eval_beir:
                    ev += ["--beir-dir", *[str(Path(d).resolve()) for d in eval_beir]]
                if tasks:
                    ev += ["--tasks", *tasks]
                if instruction is not None:
                    ev += ["--instruction", instruction]
                steps.append(Step("eval", "eval", ev, str(cdir / "eval")))
                cells[name] = {
                    "cell": name,
                    "schedule": schedule,
                    "pooling": pooling,
                    "mask": mask,
                    "recipe": recipe,
                    "base": base,
                    "base_name": base_name(pooling, mask),
                    "final_checkpoint": final,
                    "beir_sets": [Path(d).resolve().name for d in eval_beir],
                    "steps": [s.__dict__ for s in steps],
                }
    return Plan(out, recipe, nproc, bases, base_paths, cells)


# ------------------------------------------------------------------------------- cell status


def is_done(out: Path, cell: str) -> bool:
    return (out / "cells" / cell / "done.json").is_file()


def finish_cell(out: str | os.PathLike, cell: str) -> dict:
    """Writes `cells/<cell>/done.json` (atomically) from its plan and evaluation summary."""
    cdir = Path(out) / "cells" / cell
    plan = json.loads((cdir / "plan.json").read_text())
    summary_path = cdir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    seconds = {}
    for s in plan["steps"]:
        marker = cdir / "steps" / f"{s['name']}.done"
        if marker.is_file():
            seconds[s["name"]] = json.loads(marker.read_text() or "{}").get("seconds")
    done = {
        **{k: plan[k] for k in ("cell", "schedule", "pooling", "mask", "recipe", "beir_sets")},
        "checkpoint": plan["final_checkpoint"],
        "summary": str(summary_path),
        "categories": {c: v["average"] for c, v in summary["categories"].items()},
        "average": summary["average"]["score"],
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(cdir / "done.json", json.dumps(done, indent=1))
    return done


# ------------------------------------------------------------------------------- local runner


def _run_logged(argv: list[str], log: Path, env: dict[str, str]) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(argv), flush=True)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(
            argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    if proc.returncode != 0:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [ln for ln in text if ln.lower().startswith("error") or "Error: " in ln]
        raise RuntimeError(f"exit {proc.returncode}, see {log}: " + " | ".join(errors[:3]))


def _eval_in_process(argv: list[str], log: Path) -> None:
    """tools/evaluate_mteb.py's main() in this process (one process: saves an interpreter start
    and the mteb import per cell); its output goes to `log`."""
    import contextlib
    import logging

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import evaluate_mteb
    finally:
        sys.path.pop(0)
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(argv) + "   (in process)", flush=True)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with (
        open(log, "w", encoding="utf-8") as f,
        contextlib.redirect_stdout(f),
        contextlib.redirect_stderr(f),
    ):
        # the tool's logging.basicConfig() is a no-op while root has a handler: its log goes here
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        try:
            rc = evaluate_mteb.main(argv[2:])
        except SystemExit as err:  # argparse errors
            rc = err.code
        finally:
            root.handlers = saved[0]
            root.setLevel(saved[1])
    if rc not in (0, None):
        raise RuntimeError(f"evaluation failed (exit {rc}), see {log}")


def _run_step(step: Step, log: Path, nproc: int, in_process_eval: bool) -> float:
    from megatron_nvembed.launch import free_port  # imports torch: only when a step runs

    start = time.perf_counter()
    if step.kind == "derive":
        print("$ " + shlex.join(step.argv), flush=True)
        derive_mask_variant(*step.argv[-3:])
    elif step.kind == "eval" and in_process_eval and nproc == 1:
        _eval_in_process(step.argv, log)
    elif step.kind == "eval" and nproc > 1:
        run = [_py(), "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        run += ["--master_port", str(free_port()), *step.argv[1:]]
        _run_logged(run, log, {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    elif step.kind == "train":
        env = {
            "NPROC_PER_NODE": str(nproc),
            "MASTER_PORT": str(free_port()),
            "PYTHON": _py(),
        }
        _run_logged(step.argv, log, env)
    else:
        _run_logged(step.argv, log, {})
    return time.perf_counter() - start


def run_local(plan: Plan, *, in_process_eval: bool = True) -> dict[str, str]:
    """Runs every unfinished cell, one after another; returns {cell: "done" | "skipped" |
    "failed: ..."}. A cell's finished steps are skipped; an unfinished training step resumes
    from its last checkpoint (`--load`); a failed cell does not stop the others."""
    status: dict[str, str] = {}
    out = plan.out
    for name, cell in plan.cells.items():
        cdir = out / "cells" / name
        if is_done(out, name):
            _warn_if_changed(cdir, cell)
            print(f"== {name}: finished earlier, skipped", flush=True)
            status[name] = "skipped"
            continue
        print(f"== {name}", flush=True)
        write_atomic(cdir / "plan.json", json.dumps(cell, indent=1))
        try:
            for step in plan.bases[cell["base_name"]]:
                if not (Path(step.output) / TRACKER).is_file():
                    sec = _run_step(step, out / "bases" / "logs" / f"{step.name}.log", 1, False)
                    print(f"  {step.name}: {sec:.1f}s", flush=True)
            for s in cell["steps"]:
                step = Step(**s)
                marker = cdir / "steps" / f"{step.name}.done"
                if marker.is_file():
                    print(f"  {step.name}: finished earlier", flush=True)
                    continue
                sec = _run_step(
                    step, cdir / "logs" / f"{step.name}.log", plan.nproc, in_process_eval
                )
                write_atomic(marker, json.dumps({"seconds": round(sec, 2)}))
                print(f"  {step.name}: {sec:.1f}s", flush=True)
            finish_cell(out, name)
            status[name] = "done"
        except Exception as err:  # one failed cell must not stop the grid
            print(f"  FAILED: {err}", flush=True)
            status[name] = f"failed: {str(err).splitlines()[0]}"
    return status


def _warn_if_changed(cdir: Path, cell: dict) -> None:
    try:
        old = json.loads((cdir / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    if [s["argv"] for s in old["steps"]] != [s["argv"] for s in cell["steps"]]:
        print(
            f"warning: {cdir} finished with other commands than this grid's (delete the folder "
            "to redo it)",
            flush=True,
        )


# ------------------------------------------------------------------------------ SLURM scripts


def write_slurm(
    plan: Plan,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    time_limit: str = "24:00:00",
    sbatch_lines: list[str] = (),
) -> list[Path]:
    """`OUT/slurm/bases.sbatch` (imports), one `<cell>.sbatch` per unfinished cell and
    `submit_all.sh` (bases first, cells after it succeeded); nothing is submitted. Each cell
    script maps the allocation onto examples/pretrain_nvembed.sh's environment as
    examples/pretrain_nvembed.slurm does, skips its finished steps and writes done.json last."""
    out = plan.out
    sdir = out / "slurm"
    (sdir / "logs").mkdir(parents=True, exist_ok=True)

    def header(job: str, n: int) -> list[str]:
        return [
            "#!/usr/bin/env bash",
            f"#SBATCH --job-name={job}",
            f"#SBATCH --nodes={n}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={gpus_per_node}",
            f"#SBATCH --time={time_limit}",
            "#SBATCH --signal=TERM@300",
            "#SBATCH --requeue",
            f"#SBATCH --output={sdir / 'logs'}/%x-%j.out",
            *[f"#SBATCH {line}" for line in sbatch_lines],
            "set -euo pipefail",
            f"cd {shlex.quote(str(ROOT))}",
        ]

    written = []
    lines = header("ablation-bases", 1)
    seen = set()
    for name in dict.fromkeys(c["base_name"] for c in plan.cells.values()):
        for step in plan.bases[name]:
            if step.name in seen:
                continue
            seen.add(step.name)
            tracker = shlex.quote(str(Path(step.output) / TRACKER))
            lines.append(f"[[ -f {tracker} ]] || {shlex.join(step.argv)}")
    lines.append('echo "bases ready"')
    write_atomic(sdir / "bases.sbatch", "\n".join(lines) + "\n")
    written.append(sdir / "bases.sbatch")

    cell_scripts = []
    for name, cell in plan.cells.items():
        cdir = out / "cells" / name
        if is_done(out, name):
            continue
        write_atomic(cdir / "plan.json", json.dumps(cell, indent=1))
        lines = header(f"ablation-{name}", nodes)
        lines += [
            f"CELL={shlex.quote(str(cdir))}",
            'if [[ -f "$CELL/done.json" ]]; then echo "$CELL finished earlier"; exit 0; fi',
            'mkdir -p "$CELL/steps" "$CELL/logs"',
            'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            'export MASTER_PORT="${MASTER_PORT:-6000}"',
            'export NNODES="$SLURM_NNODES"',
            f'export GPUS_PER_NODE="${{SLURM_GPUS_PER_NODE:-{gpus_per_node}}}"',
        ]
        for s in cell["steps"]:
            marker = f'"$CELL/steps/{s["name"]}.done"'
            if s["kind"] == "train":
                inner = "NODE_RANK=$SLURM_NODEID " + shlex.join(s["argv"])
                cmd = f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}"
            else:
                cmd = 'torchrun --nproc_per_node "$GPUS_PER_NODE" ' + shlex.join(s["argv"][1:])
            lines += [
                f"if [[ ! -f {marker} ]]; then",
                f"  {cmd}",
                f"  echo '{{}}' > {marker}",
                "fi",
            ]
        finish = [_py(), _script("tools/ablate.py"), "--finish-cell", str(out), name]
        lines.append(shlex.join(finish))
        path = sdir / f"{name}.sbatch"
        write_atomic(path, "\n".join(lines) + "\n")
        written.append(path)
        cell_scripts.append(path)

    submit = [
        "#!/usr/bin/env bash",
        "# Submits the base imports, then every cell once they succeeded.",
        "set -euo pipefail",
        f"BASES=$(sbatch --parsable {shlex.quote(str(sdir / 'bases.sbatch'))})",
        *[f"sbatch --dependency=afterok:$BASES {shlex.quote(str(p))}" for p in cell_scripts],
    ]
    write_atomic(sdir / "submit_all.sh", "\n".join(submit) + "\n")
    os.chmod(sdir / "submit_all.sh", 0o755)
    written.append(sdir / "submit_all.sh")
    return written


# ------------------------------------------------------------------------------------ collect


def load_results(out: str | os.PathLike) -> list[dict]:
    """Every finished cell of `out` (its done.json) with its evaluation summary.json, in the
    canonical grid order (schedule, pooling, mask)."""
    rows = []
    for done_path in sorted(Path(out).glob("cells/*/done.json")):
        done = json.loads(done_path.read_text())
        summary = json.loads((done_path.parent / "eval" / "summary.json").read_text())
        rows.append({**done, "eval": summary})

    def order(r):
        key = []
        for axis in ("schedule", "pooling", "mask"):
            values = AXES[axis]
            key.append(values.index(r[axis]) if r[axis] in values else len(values))
        return key

    return sorted(rows, key=order)


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


def render_csv(rows: list[dict]) -> str:
    cats, beir = table_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "cell",
            "schedule",
            "pooling",
            "mask",
            *cats,
            "Average",
            *[f"ndcg_at_10:{b}" for b in beir],
        ]
    )
    for r in rows:
        vals = ["" if v is None else repr(float(v)) for v in _values(r, cats, beir)]
        w.writerow([r["cell"], r["schedule"], r["pooling"], r["mask"], *vals])
    return buf.getvalue()


def render_markdown(rows: list[dict]) -> str:
    """Paper Tables 2-4 layout: one table per schedule, rows pooling x mask, MTEB category columns
    (scores x 100), then nDCG@10 per local BEIR set."""
    cats, beir = table_columns(rows)
    lines = ["# Ablation: pooling x attention mask x training schedule", ""]
    if not rows:
        return "\n".join([*lines, "No finished cell yet.", ""])
    lines.append(
        "Scores x 100 from each cell's `eval/summary.json` (mteb main scores; category = mean of "
        "its tasks, Average = mean over all tasks of the seven categories)."
    )
    head = ["Pooling", "Mask", *[f"{c} ({_ntasks(rows, c)})" for c in cats], "Average"]
    head += [f"{b} nDCG@10" for b in beir]
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        lines += ["", f"## {schedule}", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            if r["schedule"] != schedule:
                continue
            vals = ["-" if v is None else f"{100 * v:.2f}" for v in _values(r, cats, beir)]
            lines.append("| " + " | ".join([r["pooling"], r["mask"], *vals]) + " |")
    return "\n".join(lines) + "\n"


def _ntasks(rows: list[dict], cat: str) -> int:
    return max(r["eval"]["categories"].get(cat, {}).get("num_tasks", 0) for r in rows)


# matplotlib is optional: the `ablate` extra of setup.py brings it (with mteb for the evaluations).
PLOT_SKIPPED_MESSAGE = (
    "ablation.png skipped: matplotlib is not installed (pip install -e '.[ablate]' adds it)"
)


def plotting_available() -> bool:
    """Whether matplotlib can be imported (render_png needs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_png(rows: list[dict]) -> bytes:
    """Grouped bars: one group per category (and Average), one bar per variant. Needs matplotlib
    (see plotting_available)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats, _ = table_columns(rows)
    cols = [*cats, "Average"]
    n = max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, len(cols) * (1.0 + 0.25 * n)), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = _values(r, cats, [])
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ys = [float("nan") if v is None else 100 * v for v in vals]
        ax.bar(xs, ys, width, label=f"{r['schedule']} / {r['pooling']} / {r['mask']}")
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
    finished cell; returns the rows. Without matplotlib the plot is skipped with a one-line
    message naming the extra to install, and an ablation.png of an earlier collection is removed
    (it would disagree with the new table)."""
    out = Path(out)
    rows = load_results(out)
    write_atomic(out / "ablation.md", render_markdown(rows))
    write_atomic(out / "ablation.csv", render_csv(rows))
    if rows:
        if plotting_available():
            write_atomic(out / "ablation.png", render_png(rows))
        else:
            (out / "ablation.png").unlink(missing_ok=True)
            print(PLOT_SKIPPED_MESSAGE, flush=True)
    return rows
