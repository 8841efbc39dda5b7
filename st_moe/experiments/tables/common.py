"""What every table shares: its settings, its runs (st_moe.experiments.jobs), its output files.

A table is a set of runs, each in its own folder `<out>/runs/<run id>`, trained and evaluated
through `t5_mesh_transformer` by st_moe.experiments.jobs: rerunning skips finished runs, resumes
unfinished ones from their checkpoint, and several tables share a run when its settings are the
same (the entropy table traces the capacity table's run at train capacity factor 1.25).

Divergence: st_moe.experiments.divergence's rule; a diverged run is stopped, recorded in its
`diverged.json`, counted as unstable, and never evaluated or hidden.

Seeds: st_moe.seeded_train_dataset_fn takes the seed for the SeqIO shuffle and the TF graph seed, so
the same seed gives the same data order (and the same initialisation where the graphs match) in
every variant.
"""
import csv
import dataclasses
import io
import os
import shlex
import sys
from typing import Dict, Optional, Sequence, Tuple

from st_moe.analysis import reporting
from st_moe.experiments import jobs

SCALES = ("tiny", "small", "l", "32b")
DEFAULT_TASK = "st_moe_embedded_span_corruption"
# The task each scale trains on by default (--task overrides): tiny the pydoc text, small the docs
# corpus with its 8k vocabulary (tasks/corpus.py), l and 32b C4.
SCALE_TASKS = {"tiny": DEFAULT_TASK, "small": "st_moe_embedded_docs_span_corruption",
               "l": "st_moe_pretrain", "32b": "st_moe_pretrain"}
CPU_SCALES = ("tiny", "small")
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
DEFAULT_EVAL_CF = 2.0  # the paper's (and our model files') evaluation capacity factor


@dataclasses.dataclass
class Config:
  """What a table is run with (tools/reproduce.py's flags; defaults per scale there)."""
  scale: str = "tiny"
  out: str = "reproduction_out"
  seeds: int = 3
  # stability: the baseline's seeds (None: twice --seeds, as the paper's Table 3: 6 and 3)
  baseline_seeds: Optional[int] = None
  steps: int = 200
  batch_size: int = 16
  inputs_length: int = 64
  targets_length: int = 16
  eval_steps: int = 5
  checkpoint_every: int = 100
  task: str = DEFAULT_TASK
  trace_tokens: int = 2048
  variants: Tuple[str, ...] = ()  # stability variants; () = all of them
  capacity_factors_train: Tuple[float, ...] = CAPACITY_FACTORS
  capacity_factors_eval: Tuple[float, ...] = CAPACITY_FACTORS
  gin_params: Tuple[str, ...] = ()  # the user's --gin_param, after every run's own bindings
  tpu_flags: Tuple[str, ...] = ()  # passed to t5_mesh_transformer at scales l and 32b
  jobs: int = 1  # runs trained at once (each is its own t5_mesh_transformer process)
  # the fine-tuning tables (st_moe.experiments.tables.finetune)
  finetune_steps: int = 100  # fine-tuning steps of every cell
  finetune_checkpoints: int = 3  # checkpoints decoded per fine-tuning run (the peak is reported)
  rows: Tuple[str, ...] = ()  # only these rows of an ablation or fine-tuning table (as in its .md)

  def shape(self) -> "jobs.Shape":
    return jobs.Shape(self.batch_size, self.inputs_length, self.targets_length)

  def sequence_length(self):
    return self.shape().sequence_length()


# Defaults per scale: the tiny ones keep stability (3 seeds) within 30 min on 2 CPU cores. A tiny
# run is mostly single-threaded graph building, so two stability runs go side by side there; a TPU
# takes one. capacity (and entropy, which reuses its run) times steps: one run at a time.
SCALE_DEFAULTS = {
    "tiny": dict(steps=200, batch_size=16, inputs_length=64, targets_length=16, eval_steps=5,
                 checkpoint_every=100, finetune_steps=100, jobs=min(2, os.cpu_count() or 1)),
    # small: st_moe_small / dense_small (d_model 128, 8 experts) on the docs corpus; sized so that a
    # table of 3 seeds x 2 models trains within 2 hours on 2 cores (docs/reproduction/).
    "small": dict(steps=1000, batch_size=32, inputs_length=128, targets_length=32, eval_steps=20,
                  checkpoint_every=500, finetune_steps=300, jobs=min(2, os.cpu_count() or 1)),
    "l": dict(steps=10000, batch_size=2048, inputs_length=512, targets_length=114, eval_steps=50,
              checkpoint_every=1000, finetune_steps=10000, jobs=1),
    "32b": dict(steps=10000, batch_size=2048, inputs_length=512, targets_length=114,
                eval_steps=50, checkpoint_every=1000, finetune_steps=10000, jobs=1),
}

STABILITY_SMALL_STEPS = 300


def config_for(table, scale="tiny", **settings) -> Config:
  """The Config of `table` at `scale`: the scale's defaults, then `settings` that are not None.

  Seeds default to 3 for stability, sparse_vs_dense and the fine-tuning tables and 1 otherwise;
  jobs to the scale's, except 1 for capacity (its step-time column compares runs, so it trains one
  at a time); steps to the scale's, except STABILITY_SMALL_STEPS for stability at small.
  """
  if scale not in SCALES:
    raise ValueError(f"--scale={scale!r}: must be one of {', '.join(SCALES)}")
  values = dict(SCALE_DEFAULTS[scale])
  values["task"] = SCALE_TASKS[scale]
  values["seeds"] = 3 if (table in ("stability", "sparse_vs_dense")
                          or table.startswith("finetune_")) else 1
  if table == "capacity":
    values["jobs"] = 1
  if table == "stability" and scale == "small":
    # 6 + 6 x 3 = 24 runs within 2 hours on 2 cores: 300 steps each (gin/runs/stability_small.gin)
    values["steps"] = STABILITY_SMALL_STEPS
  values.update({k: v for k, v in settings.items() if v is not None})
  return Config(scale=scale, **values)


def validate_common(config: Config):
  """Raises ValueError naming the first setting every table needs that cannot work."""
  checks = [
      ("--scale", config.scale, config.scale in SCALES, f"one of {', '.join(SCALES)}"),
      ("--seeds", config.seeds, config.seeds >= 1, "an integer >= 1"),
      ("--baseline_seeds", config.baseline_seeds,
       config.baseline_seeds is None or config.baseline_seeds >= 1,
       "an integer >= 1 (default: twice --seeds)"),
      ("--steps", config.steps, config.steps >= 1, "an integer >= 1"),
      ("--eval_steps", config.eval_steps, config.eval_steps >= 1, "an integer >= 1"),
      ("--checkpoint_every", config.checkpoint_every, config.checkpoint_every >= 1,
       "an integer >= 1"),
      ("--trace_tokens", config.trace_tokens, config.trace_tokens >= 1, "an integer >= 1"),
      ("--jobs", config.jobs, config.jobs >= 1, "an integer >= 1 (runs trained at once)"),
  ]
  for name, factors in (("--capacity_factors_train", config.capacity_factors_train),
                        ("--capacity_factors_eval", config.capacity_factors_eval)):
    checks.append((name, ",".join(map(str, factors)),
                   len(factors) >= 1 and all(f > 0 for f in factors), "positive numbers"))
  if config.scale not in CPU_SCALES:
    checks.append(("--tpu", " ".join(config.tpu_flags), bool(config.tpu_flags),
                   "t5_mesh_transformer's TPU flags, e.g. --tpu=NAME --gcp_project=P "
                   "--tpu_zone=Z (scales l and 32b train on a TPU pod)"))
  for name, value, ok, want in checks:
    if not ok:
      raise ValueError(f"{name}={value!r}: must be {want}")
  config.shape().validate()


def model_gin_files(config: Config, table: str, dense=False):
  """A run's model, layout and run files (jobs.Job adds t5's dataset.gin in front)."""
  if config.scale in CPU_SCALES:
    model = f"dense_{config.scale}.gin" if dense else f"st_moe_{config.scale}.gin"
    run_file = (f"stability_{config.scale}.gin" if table == "stability"
                else "reproduce_tiny.gin")
    return [model, "cpu.gin", run_file]
  if dense:
    model = {"l": "dense_l.gin", "32b": "dense_32b.gin"}[config.scale]
  else:
    model = {"l": "st_moe_l.gin", "32b": "st_moe_32b.gin"}[config.scale]
  layout = {"l": "tpu_v3_32_dp32.gin", "32b": "tpu_v3_1024_dp64_mp16.gin"}[config.scale]
  return [model, layout, "pretrain_c4.gin", "reproduce_tiny.gin"]


@dataclasses.dataclass
class Run:
  """One training run of a table (a jobs.Job) and its training summary."""
  job: jobs.Job
  summary: Dict = dataclasses.field(default_factory=dict)

  @property
  def name(self):
    return self.job.name

  @property
  def model_dir(self):
    return self.job.model_dir

  @property
  def diverged(self):
    return self.summary.get("diverged")


def make_run(config: Config, run_id: str, table: str, seed: int, params: Sequence[str],
             dense=False) -> Run:
  """The run `run_id` of a table: the scale's files (its dense twin's if `dense`), the seed,
  `params`, then the user's."""
  return Run(jobs.Job(
      name=run_id, model_dir=jobs.join(config.out, "runs", run_id),
      gin_files=model_gin_files(config, table, dense=dense),
      gin_params=[f"st_moe.seeded_train_dataset_fn.seed = {seed}"] + list(params)
      + list(config.gin_params),
      task=config.task, shape=config.shape(), extra_flags=tuple(config.tpu_flags)))


def train(run: Run, config: Config, show=print) -> Run:
  """Trains `run` to config.steps (skipped when done or diverged); a crashed run raises."""
  run.summary = jobs.train(run.job, config.steps, config.checkpoint_every, show=show,
                           every=max(1, config.steps // 10))
  if run.summary["status"] == "failed":
    raise RuntimeError(f"[{run.name}] training failed: {run.summary['error']}")
  return run


def _evaluation_args(config: Config, capacity_factor_eval) -> Dict:
  """jobs.evaluate's arguments for a table's evaluation at `capacity_factor_eval`."""
  return dict(name=f"eval_cf{capacity_factor_eval:g}", eval_steps=config.eval_steps,
              gin_params=jobs.capacity_params(capacity_factor_eval=capacity_factor_eval))


def evaluate(run: Run, config: Config, capacity_factor_eval, show=print) -> Dict:
  """Negative log perplexity on the validation split at the last checkpoint (cached per factor)."""
  summary = jobs.evaluate(run.job, **_evaluation_args(config, capacity_factor_eval), show=show)
  run.summary[f"eval_command_cf{capacity_factor_eval:g}"] = summary["command"]
  return summary


def check_evaluations(items: Sequence[Tuple[Run, float]], config: Config, hint: str = ""):
  """Raises jobs.MissingCheckpointError, before anything trains, if a finished run's evaluation at
  one of `items`' (run, eval capacity factor) is not cached and its checkpoint cannot be read (a
  run restored from the archive keeps its results, not its checkpoints). Without this the table
  would train its other runs first (up to an hour each at --scale=small on 2 cores) and only then
  stop at that one. Runs not finished yet are not checked: their evaluation will use the
  checkpoint they write. `hint`: a last line for the message (e.g. how to leave the run out)."""
  errors = []
  for run, cf in items:
    done = jobs.read_json(run.job.path("train_done.json"))
    if not done or done.get("train_steps") != config.steps:
      continue
    error = jobs.missing_checkpoint(run.job, **_evaluation_args(config, cf))
    if error is not None:
      errors.append(str(error))
  if errors:
    raise jobs.MissingCheckpointError(
        f"{len(errors)} evaluation(s) cannot run, checked before training anything:\n"
        + "\n".join(errors) + (f"\n{hint}" if hint else ""))


def trace(run: Run, config: Config, factors: Sequence[float], show=print) -> Dict[float, Dict]:
  """Routing traces of `run` at each eval capacity factor, in <model_dir>/trace_cf<x> (cached,
  shared by the tables that trace the same run)."""
  found = jobs.trace(run.job, {cf: run.job.path(f"trace_cf{cf:g}") for cf in factors},
                     num_tokens=config.trace_tokens, show=show)
  for cf, item in found.items():
    run.summary[f"eval_command_trace_cf{cf:g}"] = item["command"]
  return found


def pm(values, digits=3):
  """"mean +- std" over seeds (the mean alone for one seed: its spread is unknown)."""
  return reporting.format_mean_std(values, "{:.%df}" % digits)


# ---------------------------------------------------------------------------------------------
# Outputs.

_OUT = "\x00OUT\x00"


def portable_command(command, out):
  """A recorded command line without this machine's paths: venv and working-folder prefixes
  dropped, the --out folder (the parent of a table's folder `out`) written as $OUT."""
  root = os.path.dirname(jobs.abspath(out).rstrip("/"))
  prefixes = [os.path.dirname(sys.executable) + os.sep, os.getcwd() + os.sep]
  args = []
  for arg in shlex.split(command):
    arg = arg.replace(root, _OUT)
    for prefix in prefixes:
      arg = arg.replace(prefix, "")
    pieces = arg.split(_OUT)
    args.append('"$OUT"'.join(shlex.quote(p) if p else "" for p in pieces))
  return " ".join(args)


def write_table(out, name, headers, rows, intro, runs: Sequence[Run], extra_md=""):
  """<out>/<name>.md and .csv, and <out>/<name>_commands.md with every run's exact command lines."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(headers)
  writer.writerows([["" if v is None else v for v in row] for row in rows])
  jobs.write_text(jobs.join(out, f"{name}.csv"), buffer.getvalue())
  md = [f"# {name}", "", intro, "", reporting.markdown_table(headers, rows), "", extra_md,
        "", f"Command lines of every run: [{name}_commands.md]({name}_commands.md)", ""]
  jobs.write_text(jobs.join(out, f"{name}.md"), "\n".join(md))
  cmds = [f"# Runs of the {name} table", "",
          "Each run's gin files and exact command lines; rerun one row by pasting its lines with "
          "the project's venv active, after `export OUT=<the --out folder>`.", ""]
  for run in runs:
    cmds += [f"## {run.name}", "",
             "gin files: " + ", ".join(f"`{g}`" for g in run.job.run_files()), "", "```",
             portable_command(run.summary.get("command", "(not run)"), out)]
    for key in sorted(k for k in run.summary if k.startswith("eval_command")):
      cmds.append(portable_command(run.summary[key], out))
    cmds += ["```", ""]
  jobs.write_text(jobs.join(out, f"{name}_commands.md"), "\n".join(cmds))
  return jobs.join(out, f"{name}.md")
