"""Ablation grid (NV-Embed paper Tables 2-4): pooling x attention mask x training schedule, and
an objective axis (named sets of training flags) that is swept only when `--grid` names it.

Each cell imports (or reuses) a base checkpoint with its pooling and mask, trains it with
`examples/pretrain_nvembed.sh` under its schedule with its objective's flags and evaluates the
final checkpoint with `tools/evaluate_mteb.py`. `tools/ablate.py` is the command line. Modules,
by job:

- `grid`: the axes, the objectives table (`OBJECTIVES`, `--objective`), `--grid`, the cells and
  their names;
- `steps`: one typed dataclass per kind of command, and `render_argv`, the one place a step
  becomes a command line;
- `plan`: the steps of every base checkpoint and cell (`build_plan`);
- `bases`: the mask variant of a base checkpoint;
- `cells`: a cell's files (plan.json, step markers, logs, done.json);
- `local`: runs a plan here, resumable; `slurm`: writes its SLURM scripts;
- `report`: ablation.md, ablation.csv and ablation.png from the finished cells;
- `run`: `tools/ablate.py`'s work after parsing (plan, run or write SLURM scripts, report).

Layout of `OUT`:
```
OUT/
  bases/<pooling>_<mask>/      shared imported base checkpoints (import-hf, or a mask variant)
  cells/<cell>/                 <schedule>_<pooling>_<mask>[_<objective> unless the default]
    plan.json                  the cell's settings and the commands of its steps
    steps/<step>.done          a finished step (skipped when the grid is run again)
    logs/<step>.log            each step's output
    stage1/ stage2/ | train/   training checkpoints (--save, --load: an interrupted run resumes)
    eval/                      tools/evaluate_mteb.py output (summary.json, summary.md, results/)
    done.json                  written atomically last; a cell with it is never run again
  slurm/                       --run slurm: bases.sbatch, <cell>.sbatch, submit_all.sh
  ablation.md ablation.csv ablation.png
```
"""
