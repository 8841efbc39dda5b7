"""The paper's fine-tuning studies (ST-MoE, arXiv 2202.08906, Sec. 4 and Appendix E):
`finetune_protocol` (Table 20, Figure 6), `finetune_params` (Figure 5), `finetune_dropout`
(Figure 4) and `finetune_aux` (Table 5).

The pretrained models are the sparse_vs_dense table's seed-0 runs (the scale's sparse model and
its FLOP-matched dense twin), trained once (and only if missing) and shared by every table and
cell. Each cell fine-tunes one of them on the scale's downstream task (`FINETUNE_TASKS`: the
embedded pydoc-topic task on the CPU, SuperGLUE on a TPU) with finetune.gin, for `seeds` seeds
(each its own data order and dropout draws), through st_moe.experiments.finetuning, and decodes
the validation split at every fine-tuning checkpoint. The score is the paper's: the peak
validation score over fine-tuning (accuracy on the embedded task; on SuperGLUE, the mean of the
tasks' accuracies), with the score at the last step beside it.

Cells share runs when their settings are the same (the default cell is a row of every table).
The default: learning rate 1e-3, a batch of 1/4 of the pretraining batch (the paper's 262k of
1M tokens), optimizer slots kept, every parameter updated, dropout 0.1 and expert dropout 0.1,
train capacity factor 1.25 and eval 2.0, balance loss on: finetune.gin's settings but the batch
(65k tokens there; 262k here, the middle of Table 20's three).
"""
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from st_moe.analysis import reporting
from st_moe.experiments import finetuning
from st_moe.experiments import jobs
from st_moe.experiments.tables import common
from st_moe.experiments.tables import sparse_vs_dense

TABLES = ("finetune_protocol", "finetune_params", "finetune_dropout", "finetune_aux")
# The downstream task of each scale (in the vocabulary its models pretrain with).
FINETUNE_TASKS = {"tiny": "st_moe_embedded_pydoc_topic",
                  "small": "st_moe_embedded_docs_pydoc_topic",
                  "l": "st_moe_super_glue", "32b": "st_moe_super_glue"}
# Fine-tuning sequence lengths (inputs, targets): every example of the embedded task fits
# (tests/downstream_task_test.py); SuperGLUE as finetune.gin.
FINETUNE_LENGTHS = {"tiny": (128, 8), "small": (192, 8), "l": (512, 128), "32b": (512, 128)}
# The embedded task's validation split (72 examples) decodes in one batch; a TPU keeps eval.gin's.
_ONE_BATCH = ["utils.run.batch_size = ('sequences_per_batch', 72)"]
DECODE_PARAMS = {"tiny": _ONE_BATCH, "small": _ONE_BATCH, "l": [], "32b": []}
# Table 20's batch sizes, named as in the paper, as fractions of its pretraining batch (1M tokens):
# at a scale whose pretraining batch is B sequences they are B / 16, B / 4 and B sequences.
BATCHES = (("65k", 16), ("262k", 4), ("1M", 1))
LEARNING_RATES = (1e-4, 5e-4, 1e-3)
# Which parameters train (utils.run.variable_filter: a regex searched in variable names; the
# sparse layers live under /sparse_ffn/, the dense FFNs under /dense_ffn/ and
# /extra_dense_ffn_<where>/, attention under /self_attention/ and /enc_dec_attention/).
UPDATES = {"all": None, "non_moe": "^(?!.*/sparse_ffn/)", "moe": "/sparse_ffn/",
           "attention": "_attention/", "ffn": "/(extra_)?dense_ffn"}
UPDATE_NAMES = {"all": "All", "non_moe": "Non-MoE", "moe": "MoE only",
                "attention": "Attention only", "ffn": "FFN only (non-MoE)"}
SCORE = "accuracy"  # the decoded metric the score averages (SuperGLUE: over its tasks)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One fine-tuning setting (defaults: the module docstring's default cell)."""
  model: str = "sparse"  # sparse | dense (the pretrained run)
  learning_rate: float = 1e-3
  batch: str = "262k"  # a BATCHES label
  reset_slots: bool = False
  update: str = "all"  # an UPDATES key
  dropout: float = 0.1
  expert_dropout: float = 0.1
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  balance_loss: bool = True

  def run_id(self, seed: int) -> str:
    """ft_<model>_<the settings that differ from the default cell>_seed<s>: equal settings, one
    run, whichever table asks."""
    default, parts = Cell(), [f"ft_{self.model}"]
    names = {"learning_rate": "lr{:g}", "batch": "b{}", "reset_slots": "reset{}",
             "update": "update-{}", "dropout": "drop{:g}", "expert_dropout": "edrop{:g}",
             "capacity_factor_train": "cf{:g}", "capacity_factor_eval": "evalcf{:g}",
             "balance_loss": "aux{}"}
    for field, fmt in names.items():
      value = getattr(self, field)
      if value != getattr(default, field):
        parts.append(fmt.format(int(value) if isinstance(value, bool) else value))
    return "_".join(parts) + f"_seed{seed}"


def batch_sequences(config: common.Config, batch: str) -> int:
  """Sequences per fine-tuning batch: the pretraining batch over the paper's divisor (>= 1)."""
  divisor = dict(BATCHES)[batch]
  return max(1, config.batch_size // divisor)


def checkpoint_every(config: common.Config) -> int:
  """Fine-tuning steps between checkpoints: --finetune_checkpoints of them per run."""
  return max(1, config.finetune_steps // config.finetune_checkpoints)


def _model_files(config: common.Config, dense: bool) -> List[str]:
  """The model and layout files of the scale (without the pretraining run files)."""
  return common.model_gin_files(config, "finetune", dense=dense)[:2]


def _params(cell: Cell, seed: int) -> Tuple[List[str], List[str]]:
  """(bindings of training only, bindings of training and decoding)."""
  train = ["utils.run.train_dataset_fn = @st_moe.seeded_train_dataset_fn",
           f"st_moe.seeded_train_dataset_fn.seed = {seed}",
           f"learning_rate_schedules.constant_learning_rate.learning_rate = {cell.learning_rate:g}",
           f"dropout_rate = {cell.dropout:g}"]
  both = []
  if cell.model == "sparse":
    train.append(f"expert_dropout_rate = {cell.expert_dropout:g}")
    train += jobs.capacity_params(capacity_factor_train=cell.capacity_factor_train)
    both += jobs.capacity_params(capacity_factor_eval=cell.capacity_factor_eval)
    if not cell.balance_loss:
      train.append("balance_loss_coef = 0.0")
  if UPDATES[cell.update] is not None:
    train.append(f"utils.run.variable_filter = {UPDATES[cell.update]!r}")
  if cell.reset_slots:
    train.append("utils.should_load_variable.filter_fn = @st_moe.not_optimizer_slot")
  return train, both


def make_job(config: common.Config, cell: Cell, seed: int) -> Tuple[jobs.Job, jobs.Job]:
  """(fine-tuning job, its decoding job) of `cell` at `seed`."""
  dense = cell.model == "dense"
  train, both = _params(cell, seed)
  inputs, targets = FINETUNE_LENGTHS[config.scale]
  run_id = cell.run_id(seed)
  job = jobs.Job(
      name=run_id, model_dir=jobs.join(config.out, "runs", run_id),
      gin_files=_model_files(config, dense) + ["finetune.gin"],
      gin_params=train + both + list(config.gin_params),
      task=FINETUNE_TASKS[config.scale],
      shape=jobs.Shape(batch_sequences(config, cell.batch), inputs, targets),
      extra_flags=tuple(config.tpu_flags))
  decode = finetuning.decode_job_for(job, _model_files(config, dense),
                                     both + list(config.gin_params))
  return job, decode


def pretrained(config: common.Config, model: str, show=print) -> common.Run:
  """The pretrained `model` (sparse_vs_dense's seed-0 run), trained first if it is missing."""
  run = sparse_vs_dense.make_run(config, model, 0)
  common.train(run, config, show)
  if run.diverged:
    raise RuntimeError(f"[{run.name}] the pretrained {model} model diverged "
                       f"({run.summary.get('diverged')}): nothing to fine-tune")
  return run


def score(metrics: Dict[str, float]) -> Optional[float]:
  """The decoded score of one checkpoint: its SCORE, or the mean over a mixture's tasks'."""
  values = [v for k, v in metrics.items() if k == SCORE or k.endswith("/" + SCORE)]
  return sum(values) / len(values) if values else None


@dataclasses.dataclass
class Result:
  """A fine-tuned cell at one seed: peak and last score, the training summary."""
  peak: Optional[float]
  last: Optional[float]
  summary: Dict


def finetune_cell(config: common.Config, cell: Cell, seed: int, pretrained_dir: str,
                  show=print) -> Result:
  job, decode = make_job(config, cell, seed)
  summary = finetuning.finetune(
      job, decode, pretrained_dir, config.finetune_steps,
      checkpoint_every=checkpoint_every(config),
      max_decode_length=FINETUNE_LENGTHS[config.scale][1],
      decode_params=DECODE_PARAMS[config.scale], every_checkpoint=True, show=show)
  if jobs.failed(summary):
    if summary.get("status") == "failed":
      raise RuntimeError(f"[{job.name}] fine-tuning failed: {summary.get('error')}")
    return Result(None, None, summary)
  by_step = {s: score(m) for s, m in summary["decode_by_step"].items()}
  found = [v for v in by_step.values() if v is not None]
  last = by_step.get(max(by_step)) if by_step else None
  return Result(max(found) if found else None, last, summary)


# ---------------------------------------------------------------------------------------------
# The tables' rows: (label cells..., Cell, paper value or "").

# Table 20 [ST_MOE_TABLES.md]: (model, lr, batch, reset) -> SuperGLUE.
PAPER_TABLE_20 = {
    ("dense", 1e-3, "1M", False): 84.8, ("dense", 1e-3, "1M", True): 84.3,
    ("dense", 5e-4, "1M", False): 84.8, ("dense", 5e-4, "1M", True): 84.2,
    ("dense", 1e-4, "1M", False): 84.0, ("dense", 1e-4, "1M", True): 84.8,
    ("dense", 1e-3, "262k", False): 84.9, ("dense", 1e-3, "262k", True): 83.7,
    ("dense", 5e-4, "262k", False): 84.9, ("dense", 5e-4, "262k", True): 84.0,
    ("dense", 1e-4, "262k", False): 85.1, ("dense", 1e-4, "262k", True): 85.0,
    ("dense", 1e-3, "65k", False): 83.7, ("dense", 1e-3, "65k", True): 82.5,
    ("dense", 5e-4, "65k", False): 84.4, ("dense", 5e-4, "65k", True): 84.1,
    ("dense", 1e-4, "65k", False): 84.9, ("dense", 1e-4, "65k", True): 84.6,
    ("sparse", 1e-3, "1M", False): 86.9, ("sparse", 1e-3, "1M", True): 85.9,
    ("sparse", 5e-4, "1M", False): 86.1, ("sparse", 5e-4, "1M", True): 83.5,
    ("sparse", 1e-4, "1M", False): 84.3, ("sparse", 1e-4, "1M", True): 84.3,
    ("sparse", 1e-3, "262k", False): 86.2, ("sparse", 1e-3, "262k", True): 85.2,
    ("sparse", 5e-4, "262k", False): 85.5, ("sparse", 5e-4, "262k", True): 84.8,
    ("sparse", 1e-4, "262k", False): 85.1, ("sparse", 1e-4, "262k", True): 85.5,
    ("sparse", 1e-3, "65k", False): 85.8, ("sparse", 1e-3, "65k", True): 85.5,
    ("sparse", 5e-4, "65k", False): 86.5, ("sparse", 5e-4, "65k", True): 85.1,
    ("sparse", 1e-4, "65k", False): 85.6, ("sparse", 1e-4, "65k", True): 84.5,
}
# Table 5 [ST_MOE_TABLES.md]: (train CF, eval CF, aux loss) -> (% tokens dropped, SuperGLUE).
PAPER_TABLE_5 = {(0.75, 2.0, True): ("10.6", 86.5), (1.25, 2.0, True): ("0.3", 86.7),
                 (2.0, 3.0, True): ("0.0", 85.8), (4.0, 5.0, True): ("0.0", 86.4),
                 (0.75, 2.0, False): ("15.6", 85.7), (1.25, 2.0, False): ("2.9", 85.8),
                 (2.0, 3.0, False): ("0.4", 85.9), (4.0, 5.0, False): ("0.0", 86.4)}
# Figures 4 and 5 give no numbers; their findings in words [ST_MOE_TABLES.md].
PAPER_FIGURE_5 = {"all": "about equal to Non-MoE and Attention", "non_moe": "about equal to All",
                  "moe": "a drastic drop", "attention": "about equal to All",
                  "ffn": "a bit better than All"}


def protocol_cells(config) -> List[Tuple[tuple, Cell, object]]:
  rows = []
  for model in sparse_vs_dense.MODELS:
    for lr in LEARNING_RATES:
      for batch, _ in BATCHES:
        for reset in (False, True):
          cell = Cell(model=model, learning_rate=lr, batch=batch, reset_slots=reset)
          ours = f"{batch_sequences(config, batch)} x {sum(FINETUNE_LENGTHS[config.scale])}"
          rows.append(((model, f"{lr:g}", batch, ours, "reset" if reset else "kept"), cell,
                       PAPER_TABLE_20[(model, lr, batch, reset)]))
  return rows


def params_cells(config) -> List[Tuple[tuple, Cell, object]]:
  del config
  return [((UPDATE_NAMES[u], UPDATES[u] or "(all)"), Cell(update=u), PAPER_FIGURE_5[u])
          for u in UPDATES]


def dropout_cells(config) -> List[Tuple[tuple, Cell, object]]:
  del config
  rows = []
  for model in sparse_vs_dense.MODELS:
    for rate in (0.0, 0.1, 0.2, 0.3):
      rows.append(((model, f"{rate:g}", f"{rate:g}" if model == "sparse" else "-"),
                   Cell(model=model, dropout=rate, expert_dropout=rate),
                   "peak at 0.1" if rate == 0.1 else ""))
  for rate in (0.2, 0.3):  # expert dropout at 0.1 is the 0.1 row above
    rows.append((("sparse", "0.1", f"{rate:g}"), Cell(dropout=0.1, expert_dropout=rate),
                 "modest gains over 0.1"))
  return rows


def aux_cells(config) -> List[Tuple[tuple, Cell, object]]:
  del config
  rows = []
  for aux in (True, False):
    for train_cf, eval_cf in ((0.75, 2.0), (1.25, 2.0), (2.0, 3.0), (4.0, 5.0)):
      rows.append(((f"{train_cf:g}", f"{eval_cf:g}", "yes" if aux else "no"),
                   Cell(capacity_factor_train=train_cf, capacity_factor_eval=eval_cf,
                        balance_loss=aux), PAPER_TABLE_5[(train_cf, eval_cf, aux)]))
  return rows


SPECS = {
    "finetune_protocol": (protocol_cells, ["model", "learning rate", "batch (paper)",
                                           "batch (ours: sequences x tokens)", "optimizer slots"]),
    "finetune_params": (params_cells, ["parameters updated", "variable filter"]),
    "finetune_dropout": (dropout_cells, ["model", "dropout", "expert dropout"]),
    "finetune_aux": (aux_cells, ["train CF", "eval CF", "balance loss"]),
}


def row_label(labels: tuple) -> str:
  return " / ".join(str(l) for l in labels)


def selected(config: common.Config, table: str):
  """The table's rows, restricted to config.rows (labels as row_label writes them) when given."""
  cells, _ = SPECS[table]
  rows = cells(config)
  if not config.rows:
    return rows
  known = {row_label(r[0]) for r in rows}
  unknown = [r for r in config.rows if r not in known]
  if unknown:
    raise ValueError(f"--rows={','.join(config.rows)!r}: {unknown[0]!r} is not a row of {table}; "
                     f"its rows: {'; '.join(sorted(known))}")
  return [r for r in rows if row_label(r[0]) in config.rows]


def validate(table: str, config: common.Config):
  if config.finetune_steps < 1:
    raise ValueError(f"--finetune_steps={config.finetune_steps!r}: must be an integer >= 1")
  if config.finetune_checkpoints < 1:
    raise ValueError(f"--finetune_checkpoints={config.finetune_checkpoints!r}: must be an "
                     "integer >= 1 (decoded checkpoints per fine-tuning run)")
  selected(config, table)


def figure_6(rows, results) -> Tuple[List[str], List[list], Dict]:
  """Figure 6's averages (per learning rate, per batch, per slot handling) of ours and the paper's:
  each the mean over the table's cells with that setting (ours: of the seeds' mean peaks)."""
  headers = ["model", "average over"] + [f"LR {lr:g}" for lr in LEARNING_RATES] + [
      f"batch {b}" for b, _ in BATCHES] + ["slots kept", "slots reset"]
  out, averages = [], {}
  for model in sparse_vs_dense.MODELS:
    for who in ("ours", "paper"):
      groups = {}
      for labels, cell, paper in rows:
        if cell.model != model:
          continue
        value = jobs.mean_std([r.peak for r in results[cell]])[0] if who == "ours" else paper
        for key in (f"LR {cell.learning_rate:g}", f"batch {cell.batch}",
                    "slots reset" if cell.reset_slots else "slots kept"):
          groups.setdefault(key, []).append(value)
      means = {k: jobs.mean_std(v)[0] for k, v in groups.items()}
      averages[(model, who)] = means
      out.append([model, who] + [None if means.get(h) is None else round(means[h], 2)
                                 for h in headers[2:]])
  return headers, out, averages


def directions(averages) -> List[str]:
  """Does the paper's direction hold: the sparse model's best learning rate above the dense
  model's, its best batch smaller, and resetting the slots worse for both."""
  lines = []
  lrs = [f"LR {lr:g}" for lr in LEARNING_RATES]
  batches = [f"batch {b}" for b, _ in BATCHES]
  for what, keys, order in (("learning rate", lrs, "higher"), ("batch", batches, "smaller")):
    best = {}
    for key in ("ours", "paper"):
      best[key] = {}
      for model in sparse_vs_dense.MODELS:
        found = {k: averages[(model, key)].get(k) for k in keys}
        # A best setting needs all of them measured (--rows may run a few).
        best[key][model] = (max(found, key=found.get)
                            if all(v is not None for v in found.values()) else None)
    verdict = {}
    for key in best:
      s, d = best[key]["sparse"], best[key]["dense"]
      if s is None or d is None:
        verdict[key] = f"not measured (not every {what} of both models)"
        continue
      # LRs are listed low to high; batches small to large (BATCHES: 65k, 262k, 1M).
      rank = keys.index
      holds = rank(s) > rank(d) if order == "higher" else rank(s) < rank(d)
      verdict[key] = (f"sparse best at {s.split(' ', 1)[1]}, dense at {d.split(' ', 1)[1]}: "
                      f"sparse's {'is' if holds else 'is not'} {order}")
    lines.append(f"- Best {what} (Figure 6 averages): ours {verdict['ours']}; paper "
                 f"{verdict['paper']}.")
  for model in sparse_vs_dense.MODELS:
    parts = []
    for key in ("ours", "paper"):
      kept, reset = (averages[(model, key)].get(k) for k in ("slots kept", "slots reset"))
      parts.append("not measured" if kept is None or reset is None else
                   f"reset - kept = {reset - kept:+.2f}")
    lines.append(f"- {model}: optimizer slots reset: ours {parts[0]}; paper {parts[1]}.")
  return lines


def _plot_figure_6(averages, path, title):
  labels = [f"LR {lr:g}" for lr in LEARNING_RATES] + [f"batch {b}" for b, _ in BATCHES] + [
      "slots kept", "slots reset"]
  panels = {}
  for who, panel, ylabel in (("ours", "ours: the embedded task", "peak validation accuracy"),
                             ("paper", "the paper: SuperGLUE (Table 20)", "SuperGLUE")):
    panels[panel] = (ylabel, {model: {l: averages[(model, who)].get(l) for l in labels}
                              for model in sparse_vs_dense.MODELS})
  return reporting.plot_bar_panels(panels, path, title)


def _plot_protocol_grid(rows, results, path, title):
  """Table 20 as a grid: batch x slots down, model x learning rate across; each cell our mean
  peak +- std over seeds (colour) and the paper's SuperGLUE below it. Cells not run are blank."""
  row_keys = [(b, reset) for b, _ in BATCHES for reset in (False, True)]
  col_keys = [(m, lr) for m in sparse_vs_dense.MODELS for lr in LEARNING_RATES]
  matrix = np.full((len(row_keys), len(col_keys)), np.nan)
  text = [[""] * len(col_keys) for _ in row_keys]
  for _, cell, paper in rows:
    i = row_keys.index((cell.batch, cell.reset_slots))
    j = col_keys.index((cell.model, cell.learning_rate))
    peaks = [r.peak for r in results[cell]]
    mean, _ = jobs.mean_std(peaks)
    if mean is None:
      continue
    matrix[i, j] = mean
    shown = paper if isinstance(paper, str) else f"{paper:.1f}"
    text[i][j] = f"{common.pm(peaks, 1)}\n(paper {shown})"
  return reporting.plot_heatmap(
      matrix, [f"{b} / {'reset' if reset else 'kept'}" for b, reset in row_keys],
      [f"{m} {lr:g}" for m, lr in col_keys], path, title, cmap="viridis", vmin=0.0,
      vmax=100.0, cell_text=text, colorbar_label="peak validation accuracy (ours)")


def table(name: str, config: common.Config, show=print):
  """Pretrains (if missing), fine-tunes and decodes every cell of table `name`; writes it."""
  validate(name, config)
  rows = selected(config, name)
  out = jobs.join(config.out, name)
  models = sorted({cell.model for _, cell, _ in rows})
  pretrained_runs = {m: pretrained(config, m, show) for m in models}
  pretrained_dirs = {m: run.model_dir for m, run in pretrained_runs.items()}
  items = [(cell, seed) for _, cell, _ in rows for seed in range(config.seeds)]
  items = list(dict.fromkeys(items))  # cells shared by two rows run once

  def prepare(item, show_line):
    cell, seed = item
    return finetune_cell(config, cell, seed, pretrained_dirs[cell.model], show_line)

  done = jobs.run_all(items, prepare, config.jobs, show,
                      tag=lambda item: item[0].run_id(item[1]))
  by_item = dict(zip(items, done))
  results = {cell: [by_item[(cell, s)] for s in range(config.seeds)] for _, cell, _ in rows}
  _, label_headers = SPECS[name]
  paper_header = ("paper (SuperGLUE)" if name in ("finetune_protocol", "finetune_aux")
                  else "paper (in words)")
  headers = label_headers + (["% tokens dropped (train)"] if name == "finetune_aux" else []) + [
      "peak score (ours)", "last score (ours)", "stopped runs", "fine-tuning min / run",
      paper_header] + (
          ["% tokens dropped (paper)"] if name == "finetune_aux" else [])
  table_rows, labels, peaks, errs = [], [], [], []
  for cells, cell, paper in rows:
    found = results[cell]
    stopped = [f"seed {s}: {r.summary.get('diverged')}" for s, r in enumerate(found)
               if r.peak is None]
    row = list(cells)
    if name == "finetune_aux":
      row.append(common.pm([None if r.summary.get("train_fraction_dropped") is None
                            else 100.0 * r.summary["train_fraction_dropped"] for r in found], 1))
    minutes = [r.summary["seconds"] / 60.0 for r in found if r.summary.get("seconds")]
    row += [common.pm([r.peak for r in found], 1), common.pm([r.last for r in found], 1),
            "; ".join(stopped) or "none", common.pm(minutes, 1)]
    if name == "finetune_aux":
      row += [paper[1], paper[0]]
    else:
      row.append(paper)
    table_rows.append(row)
    labels.append(row_label(cells))
    mean, std = jobs.mean_std([r.peak for r in found])
    peaks.append(mean)
    errs.append(std)
  runs = []
  for cell, seed in items:
    job, _ = make_job(config, cell, seed)
    summary = dict(by_item[(cell, seed)].summary)
    if "decode" in summary:
      summary["eval_command_decode"] = summary["decode"].get("command", "")
    runs.append(common.Run(job, summary))
  png = f"{name}.png"
  reporting.plot_rows(labels, {"ours (mean +- std over seeds)": (peaks, errs)},
                      jobs.join(out, png), f"{name} ({config.scale}): peak validation score "
                      f"of fine-tuning, {config.seeds} seed(s)", xlabel="score")
  extra = [f"![{name}]({png})"]
  if name == "finetune_protocol":
    fig_headers, fig_rows, averages = figure_6(rows, results)
    _plot_figure_6(averages, jobs.join(out, "figure_6.png"),
                   f"Figure 6's averages ({config.scale}): ours and the paper's")
    _plot_protocol_grid(rows, results, jobs.join(out, "finetune_protocol_grid.png"),
                        f"Table 20 ({config.scale}): peak accuracy, mean +- std over "
                        f"{config.seeds} seed(s); the paper's SuperGLUE below")
    extra = ["![Table 20 as a grid](finetune_protocol_grid.png)", "",
             "## Figure 6: averages per setting", "",
             reporting.markdown_table(fig_headers, fig_rows), "",
             "Does the paper's direction hold here?", "", *directions(averages), "",
             "![Figure 6](figure_6.png)", ""] + extra
  tokens = sum(FINETUNE_LENGTHS[config.scale])
  intro = (
      f"Scale `{config.scale}`: the pretrained sparse model and its dense twin (sparse_vs_dense's "
      f"seed-0 runs: {', '.join(f'{m} `{r.name}`' for m, r in sorted(pretrained_runs.items()))}) "
      f"fine-tuned on `{FINETUNE_TASKS[config.scale]}` for {config.finetune_steps} steps "
      f"(sequences of {tokens} tokens) with finetune.gin, {config.seeds} seed(s) per row; "
      f"decoded (greedy) on the validation split every {checkpoint_every(config)} steps; "
      f"score = {SCORE} (a constant answer scores 25.0 on the embedded task), "
      "mean +- std over the seeds of each run's peak over its checkpoints (the paper's 'peak "
      "validation'), and of its last checkpoint. Unless the row says otherwise: learning rate "
      f"1e-3, batch 262k (= {batch_sequences(config, '262k')} sequences here: the paper's "
      "batches are 1/16, 1/4 and 1 of its pretraining batch, so ours are of ours, "
      f"{config.batch_size} sequences), optimizer slots kept, all parameters updated, dropout "
      "0.1 and expert dropout 0.1, train CF 1.25 and eval CF 2.0, balance loss on. The paper's "
      "column: ST-MoE-L / Dense-L on SuperGLUE (Tables 20 and 5), or its finding in words "
      "(Figures 4 and 5 give no numbers). A diverged run is stopped and listed, not scored. "
      "Fine-tuning minutes: the training process of a run (its decoding not counted).")
  return common.write_table(out, name, headers, table_rows, intro, runs, "\n".join(extra))

