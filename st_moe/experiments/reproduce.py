"""The paper's tables (ST-MoE, arXiv 2202.08906): stability study, capacity factors, routing entropy.

Library side of `tools/reproduce.py`. Every model is trained and evaluated through the entry point
users run on TPU (`t5_mesh_transformer`, via st_moe.experiments.runner); a table is a set of runs, each in its
own folder `<out>/runs/<run id>`, so rerunning skips finished runs (a `train_done.json` /
`eval_cf<x>.json` is written when a step finishes), resumes unfinished ones from their checkpoint,
and several tables share a run when its settings are the same (the entropy table traces the capacity
table's run at train capacity factor 1.25).

Divergence: st_moe.experiments.divergence's rule (NaN/inf loss, or the loss staying above
running_min + max(1.0, 0.5 |running_min|) for 3 observations after 5); a diverged run is killed,
recorded in `diverged.json`, counted as unstable, and never evaluated or hidden.

Seeds: st_moe.seeded_train_dataset_fn takes the seed for the SeqIO shuffle and the TF graph seed, so
the same seed gives the same data order (and the same initialisation where the graphs match) in
every variant.
"""
import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from st_moe.experiments import divergence
from st_moe.analysis import reporting
from st_moe.experiments import runner

TABLES = ("stability", "capacity", "entropy")
SCALES = ("tiny", "l", "32b")
DEFAULT_TASK = "st_moe_embedded_span_corruption"

# name -> (description, gin bindings on top of the scale's base run, paper's (stable, quality)).
# All variants but the last train without router z-loss, as in the paper's table: each row adds one
# stabilisation technique to (or removes one multiplicative interaction from) the baseline.
_NO_SCALE_NORM = ("[@transformer.sublayer_dropout]",
                  "[@st_moe.sublayer_rms_norm_no_scale, @transformer.sublayer_call_layer, "
                  "@transformer.sublayer_dropout, @transformer.sublayer_residual]",
                  "[@st_moe.sublayer_rms_norm_no_scale, @transformer.sublayer_dropout]")
STABILITY_VARIANTS = {
    "baseline": ("no router z-loss", ["router_z_loss_coef = 0.0"], ("4/6", "-1.755 +- 0.02")),
    "remove_geglu": ("ReLU FFNs and experts instead of GEGLU",
                     ["router_z_loss_coef = 0.0", "DenseReluDense.activation = 'relu'",
                      "st_moe.SparseFFN.activation = 'relu'"], ("3/3", "-1.849 +- 0.02")),
    "remove_rmsnorm_scale": (
        "RMSNorm without its learned scale (st_moe.sublayer_rms_norm_no_scale)",
        ["router_z_loss_coef = 0.0",
         f"transformer.LayerStack.sublayers_initial = {_NO_SCALE_NORM[0]}",
         f"transformer.LayerStack.sublayers_per_layer = {_NO_SCALE_NORM[1]}",
         f"transformer.LayerStack.sublayers_final = {_NO_SCALE_NORM[2]}"],
        ("3/3", "-2.020 +- 0.06")),
    "input_jitter": ("router input jitter 1e-2",
                     ["router_z_loss_coef = 0.0", "st_moe.SparseFFN.router_jitter_eps = 0.01"],
                     ("3/3", "-1.777 +- 0.03")),
    "dropout": ("dropout 0.1 (model and experts)",
                ["router_z_loss_coef = 0.0", "dropout_rate = 0.1", "expert_dropout_rate = 0.1"],
                ("3/3", "-1.822 +- 0.11")),
    "update_clipping": ("Adafactor update clipping 0.1",
                        ["router_z_loss_coef = 0.0",
                         "optimize.AdafactorOptimizer.clipping_threshold = 0.1"],
                        ("3/3", "-4.206 +- 0.17")),
    "router_z_loss": ("router z-loss 1e-3", ["router_z_loss_coef = 0.001"],
                      ("3/3", "-1.741 +- 0.02")),
}

CAPACITY_FACTORS = (1.0, 1.25, 2.0)
# Paper's step times (s) against train capacity factor [ST-MoE Table 4 discussion].
PAPER_STEP_TIME = {"l": {1.25: 2.397, 2.0: 2.447}, "32b": {1.25: 4.244, 2.0: 4.819}}
PAPER_ENTROPY = {"encoder": [2.2, 1.8, 1.6, 1.7, 1.7, 1.2], "decoder": [3.4] * 6,
                 "uniform": math.log(32)}


@dataclasses.dataclass
class Config:
  """What a table is run with. Defaults per scale come from `default_config`."""
  scale: str = "tiny"
  out: str = "reproduction_out"
  seeds: int = 3
  steps: int = 200
  batch_size: int = 16
  inputs_length: int = 64
  targets_length: int = 16
  eval_steps: int = 5
  checkpoint_every: int = 100
  task: str = DEFAULT_TASK
  trace_tokens: int = 2048
  variants: Tuple[str, ...] = tuple(STABILITY_VARIANTS)
  train_capacity_factors: Tuple[float, ...] = CAPACITY_FACTORS
  eval_capacity_factors: Tuple[float, ...] = CAPACITY_FACTORS
  extra_gin_params: Tuple[str, ...] = ()
  tpu_flags: Tuple[str, ...] = ()  # passed to t5_mesh_transformer at scales l and 32b
  jobs: int = 1  # runs trained at once (each is its own t5_mesh_transformer process)

  def sequence_length(self):
    return {"inputs": self.inputs_length, "targets": self.targets_length}


def validate(table, config: Config):
  """Raises ValueError naming the first setting that cannot work (before anything runs)."""
  checks = [
      ("TABLE", table, table in TABLES, f"one of {', '.join(TABLES)}"),
      ("--scale", config.scale, config.scale in SCALES, f"one of {', '.join(SCALES)}"),
      ("--seeds", config.seeds, config.seeds >= 1, "an integer >= 1"),
      ("--steps", config.steps, config.steps >= 1, "an integer >= 1"),
      ("--batch_size", config.batch_size, config.batch_size >= 1, "an integer >= 1"),
      ("--inputs_length", config.inputs_length, config.inputs_length >= 2, "an integer >= 2"),
      ("--targets_length", config.targets_length, config.targets_length >= 2, "an integer >= 2"),
      ("--eval_steps", config.eval_steps, config.eval_steps >= 1, "an integer >= 1"),
      ("--checkpoint_every", config.checkpoint_every, config.checkpoint_every >= 1,
       "an integer >= 1"),
      ("--jobs", config.jobs, config.jobs >= 1, "an integer >= 1 (runs trained at once)"),
  ]
  unknown = [v for v in config.variants if v not in STABILITY_VARIANTS]
  checks.append(("--variants", ",".join(unknown) or ",".join(config.variants),
                 not unknown and len(config.variants) >= 1,
                 f"a non-empty list from {', '.join(STABILITY_VARIANTS)}"))
  for name, factors in (("--train_capacity_factors", config.train_capacity_factors),
                        ("--eval_capacity_factors", config.eval_capacity_factors)):
    checks.append((name, ",".join(map(str, factors)),
                   len(factors) >= 1 and all(f > 0 for f in factors), "positive numbers"))
  if config.scale != "tiny":
    checks.append(("--tpu", " ".join(config.tpu_flags), bool(config.tpu_flags),
                   "t5_mesh_transformer's TPU flags, e.g. --tpu=NAME --gcp_project=P "
                   "--tpu_zone=Z (scales l and 32b train on a TPU pod)"))
  for name, value, ok, want in checks:
    if not ok:
      raise ValueError(f"{name}={value!r}: must be {want}")


# ---------------------------------------------------------------------------------------------
# Runs.


def model_gin_files(config: Config, table: str, dense=False):
  """The gin files of a run: dataset, model, layout, run file."""
  if config.scale == "tiny":
    model = "dense_tiny.gin" if dense else "st_moe_tiny.gin"
    run_file = "stability_tiny.gin" if table == "stability" else "reproduce_tiny.gin"
    return ["dataset.gin", model, "cpu.gin", run_file]
  model = {"l": "st_moe_l.gin", "32b": "st_moe_32b.gin"}[config.scale]
  layout = {"l": "tpu_v3_32_dp32.gin", "32b": "tpu_v3_1024_dp64_mp16.gin"}[config.scale]
  return ["dataset.gin", model, layout, "pretrain_c4.gin", "reproduce_tiny.gin"]


def common_params(config: Config, seed):
  return [f"MIXTURE_NAME = '{config.task}'",
          f"utils.run.batch_size = ('sequences_per_batch', {config.batch_size})",
          f"utils.run.sequence_length = {config.sequence_length()!r}",
          f"st_moe.seeded_train_dataset_fn.seed = {seed}"] + list(config.extra_gin_params)


@dataclasses.dataclass
class Run:
  """One training run of a table and what was learned about it."""
  run_id: str
  gin_files: List[str]
  params: List[str]
  model_dir: str
  summary: Dict = dataclasses.field(default_factory=dict)

  @property
  def diverged(self):
    return self.summary.get("diverged")


def _mean_tail(values, frac=0.25):
  if not values:
    return None
  tail = values[-max(1, int(len(values) * frac)):]
  return sum(tail) / len(tail)


def train(run: Run, config: Config, show=print):
  """Trains `run` to config.steps: skips it when done (or diverged), else resumes it."""
  done_path = os.path.join(run.model_dir, "train_done.json")
  div_path = os.path.join(run.model_dir, "diverged.json")
  for path in (done_path, div_path):
    done = runner.read_json(path)
    if done and done.get("train_steps") == config.steps:
      show(f"[{run.run_id}] already {'trained' if path == done_path else 'diverged'} "
           f"(delete {path} to rerun)")
      run.summary = done
      return run
  start = runner.latest_checkpoint_step(run.model_dir) or 0
  show(f"[{run.run_id}] training steps {start + 1}..{config.steps}"
       + (" (resuming from its checkpoint)" if start else ""))
  params = run.params + [f"utils.run.train_steps = {config.steps}",
                         f"utils.run.save_checkpoints_steps = {config.checkpoint_every}",
                         f"utils.run.iterations_per_loop = {config.checkpoint_every}",
                         "st_moe.SparseFFN.print_metrics = True"]
  tokens = runner.tokens_per_step(config.batch_size, config.sequence_length())
  result = runner.run(run.model_dir, run.gin_files, params, tokens_per_step=tokens,
                      label="train", every=max(1, config.steps // 10),
                      monitor=divergence.DivergenceMonitor(), show=show,
                      extra_flags=config.tpu_flags)
  tps = result.tokens_per_second
  summary = {
      "train_steps": config.steps,
      "returncode": result.returncode,
      "diverged": result.diverged.reason if result.diverged else None,
      "diverged_step": result.diverged.step if result.diverged else None,
      "final_train_loss": result.losses[-1] if result.losses else None,
      "tokens_per_second": tps,
      "step_seconds": tokens / tps if tps else None,
      "train_fraction_dropped": _mean_tail(result.router["dropped"]),
      "command": runner.shell_quote(result.command),
      "gin_files": run.gin_files,
  }
  run.summary = summary
  if result.diverged:
    show(f"[{run.run_id}] DIVERGED: {result.diverged.reason}; counted as unstable")
    runner.write_json(div_path, summary)
  elif result.returncode == 0:
    runner.write_json(done_path, summary)
  else:
    raise RuntimeError(f"[{run.run_id}] training failed (exit {result.returncode}); log: "
                       f"{result.log_path}")
  return run


def evaluate(run: Run, config: Config, eval_capacity_factor, show=print):
  """Negative log perplexity on the validation split at the last checkpoint (cached per factor)."""
  step = runner.latest_checkpoint_step(run.model_dir)
  path = os.path.join(run.model_dir, f"eval_cf{eval_capacity_factor:g}.json")
  cached = runner.read_json(path)
  if cached and cached.get("step") == step and cached.get("eval_steps") == config.eval_steps:
    return cached
  show(f"[{run.run_id}] evaluating step {step} at eval capacity factor {eval_capacity_factor:g}")
  params = run.params + ["utils.run.dataset_split = 'validation'",
                         f"utils.run.eval_checkpoint_step = {step}",
                         f"utils.run.perplexity_eval_steps = {config.eval_steps}",
                         f"capacity_factor_eval = {eval_capacity_factor}",
                         f"st_moe.SparseFFN.capacity_factor_eval = {eval_capacity_factor}",
                         "st_moe.SparseFFN.print_metrics = True"]
  result = runner.run(run.model_dir, run.gin_files + ["perplexity_eval.gin"], params,
                      tokens_per_step=1, label=f"eval_cf{eval_capacity_factor:g}", show=show,
                      extra_flags=config.tpu_flags)
  found = runner.eval_results(result.log_path)
  if result.returncode != 0 or not found:
    raise RuntimeError(f"[{run.run_id}] evaluation failed; log: {result.log_path}")
  dropped = []
  with open(result.log_path) as f:
    for line in f:
      m = runner.ROUTER_RE.search(line)
      if m:
        dropped.append(float(m.group(3)))
  summary = {"step": found[-1][0], "eval_steps": config.eval_steps,
             "neg_log_perplexity": found[-1][1].get("neg_log_perplexity"),
             "eval_fraction_dropped": sum(dropped) / len(dropped) if dropped else None,
             "command": runner.shell_quote(result.command)}
  runner.write_json(path, summary)
  return summary


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
  return mean, std


def _pm(mean, std, digits=3):
  return "" if mean is None else f"{mean:.{digits}f} +- {std:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Outputs.


def portable_command(command, out):
  """A recorded command line without this machine's paths: venv and repository prefixes dropped,
  the --out folder (the parent of a table's folder `out`) written as $OUT."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  root = os.path.dirname(os.path.abspath(out))
  command = command.replace(os.path.dirname(sys.executable) + os.sep, "")
  command = command.replace(repo + os.sep, "")
  return command.replace(root, "$OUT")


def write_table(out, name, headers, rows, intro, runs: Sequence[Run], extra_md=""):
  """<out>/<name>.md and .csv, and <out>/<name>_commands.md with every run's exact command lines."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(headers)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
  md = [f"# {name}", "", intro, "", reporting.markdown_table(headers, rows), "", extra_md,
        "", f"Command lines of every run: [{name}_commands.md]({name}_commands.md)", ""]
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write("\n".join(md))
  cmds = [f"# Runs of the {name} table", "",
          "Each run's gin files and exact command lines; rerun one row by pasting its lines from "
          "the repository's root with the project's venv active, after `export OUT=<the --out "
          "folder>`.", ""]
  for run in runs:
    cmds += [f"## {run.run_id}", "", "gin files: " + ", ".join(f"`{g}`" for g in run.gin_files),
             "", "```", portable_command(run.summary.get("command", "(not run)"), out)]
    for key in sorted(k for k in run.summary if k.startswith("eval_command")):
      cmds.append(portable_command(run.summary[key], out))
    cmds += ["```", ""]
  with open(os.path.join(out, f"{name}_commands.md"), "w") as f:
    f.write("\n".join(cmds))
  return os.path.join(out, f"{name}.md")


def each_run(runs: Sequence[Run], prepare, jobs, show=print):
  """prepare(run, show) for every run, `jobs` at a time; returns the results in the runs' order.

  A tiny run spends most of its wall time in one Python thread (building and lowering the mtf
  graph, writing checkpoints' meta graphs), so two runs side by side on two cores take little more
  than one. With jobs > 1 every line shown is prefixed with its run's id; the first failure cancels
  the runs not yet started and is raised once the running ones end.
  """
  if jobs <= 1 or len(runs) <= 1:
    return [prepare(run, show) for run in runs]
  lock = threading.Lock()

  def show_for(run):
    def show_line(line):
      tag = f"[{run.run_id}]"
      with lock:
        show(line if line.startswith(tag) else f"{tag} {line}")
    return show_line

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = [pool.submit(prepare, run, show_for(run)) for run in runs]
    try:
      return [f.result() for f in futures]
    except BaseException:
      for f in futures:
        f.cancel()
      raise


def stability(config: Config, show=print):
  """The stability study table; returns the markdown path."""
  out = os.path.join(config.out, "stability")
  runs_dir = os.path.join(config.out, "runs")
  plan = {(variant, seed): Run(f"stability_{variant}_seed{seed}",
                               model_gin_files(config, "stability"),
                               common_params(config, seed) + STABILITY_VARIANTS[variant][1],
                               os.path.join(runs_dir, f"stability_{variant}_seed{seed}"))
          for variant in config.variants for seed in range(config.seeds)}

  def prepare(run, show_line):
    train(run, config, show_line)
    if run.diverged:
      return None
    ev = evaluate(run, config, _default_eval_cf(config), show_line)
    run.summary["eval_command"] = ev["command"]
    return ev["neg_log_perplexity"]

  runs = list(plan.values())
  quality = dict(zip(plan, each_run(runs, prepare, config.jobs, show)))
  rows, panels, stopped = [], {}, []
  for variant in config.variants:
    description, _, paper = STABILITY_VARIANTS[variant]
    curves = panels.setdefault(variant, {})
    stable_q, diverged_at = [], []
    for seed in range(config.seeds):
      run = plan[(variant, seed)]
      curves[f"seed {seed}"] = runner.steps_and_losses(run.model_dir)
      if run.diverged:
        diverged_at.append(f"seed {seed} at step {run.summary.get('diverged_step')}")
        stopped.append((variant, f"seed {seed}"))
      else:
        stable_q.append(quality[(variant, seed)])
    mean, std = _mean_std(stable_q)
    rows.append([variant, description, f"{len(stable_q)}/{config.seeds}", _pm(mean, std),
                 "; ".join(diverged_at) or "none", paper[0], paper[1]])
  finite = [v for c in panels.values() for _, vs in c.values() for v in vs if math.isfinite(v)]
  low = min(finite, default=0.0)
  reporting.plot_panels(panels, os.path.join(out, "stability_curves.png"),
                        f"Training loss per variant and seed ({config.scale}); x = stopped "
                        "as diverged", ylim=(max(0.0, low - 0.5), low + 8.0), stopped=stopped)
  intro = (f"Scale `{config.scale}`, {config.seeds} seed(s) x {len(config.variants)} variants, "
           f"{config.steps} steps of {config.batch_size} x ({config.inputs_length} + "
           f"{config.targets_length}) tokens on `{config.task}`; quality = negative log "
           f"perplexity per target token on the validation split ({config.eval_steps} batches), "
           f"mean +- std over the stable seeds. Run file: "
           f"`{model_gin_files(config, 'stability')[-1]}`. Divergence rule: "
           "loss NaN/inf, or above running_min + max(1.0, 0.5 |running_min|) for 3 consecutive "
           "observations after the first 5 (st_moe/divergence.py); diverged runs are stopped and "
           "listed. Paper columns: ST-MoE Table 3 (32 experts, 6 seeds for the baseline).")
  intro += (" A seed fixes the data order and the initial weights, and with resource variables "
            "(st_moe.register.use_resource_variables) the first steps of a rerun are bit-identical, but a "
            "remaining upstream race (Adafactor's decay reads the global step unordered with its "
            "increment) and this learning rate's chaos let a rerun part later: each cell is a "
            "sample; compare variants with more --seeds.")
  headers = ["variant", "change", "stable runs", "quality (ours)", "diverged runs",
             "stable runs (paper)", "quality (paper)"]
  return write_table(out, "stability", headers, rows, intro, runs,
                     "![loss curves](stability_curves.png)")


def _default_eval_cf(config):
  del config
  return 2.0


def capacity(config: Config, show=print):
  """Train x eval capacity factor grid: quality, fraction dropped, step time."""
  out = os.path.join(config.out, "capacity")
  runs_dir = os.path.join(config.out, "runs")
  plan = {(train_cf, seed): _capacity_run(config, train_cf, seed, runs_dir)
          for train_cf in config.train_capacity_factors for seed in range(config.seeds)}

  def prepare(run, show_line):
    train(run, config, show_line)
    if run.diverged:
      return {}
    evals = {}
    for eval_cf in config.eval_capacity_factors:
      evals[eval_cf] = evaluate(run, config, eval_cf, show_line)
      run.summary[f"eval_command_cf{eval_cf:g}"] = evals[eval_cf]["command"]
    return evals

  runs = list(plan.values())
  evals = dict(zip(plan, each_run(runs, prepare, config.jobs, show)))
  rows, heat = [], []
  for train_cf in config.train_capacity_factors:
    seed_runs = [plan[(train_cf, seed)] for seed in range(config.seeds)]
    heat_row = []
    for eval_cf in config.eval_capacity_factors:
      found = [evals[(train_cf, seed)][eval_cf] for seed in range(config.seeds)
               if eval_cf in evals[(train_cf, seed)]]
      quality = [ev["neg_log_perplexity"] for ev in found]
      dropped = [ev["eval_fraction_dropped"] for ev in found]
      q_mean, q_std = _mean_std(quality)
      d_mean, _ = _mean_std(dropped)
      t_mean, _ = _mean_std([r.summary.get("step_seconds") for r in seed_runs])
      tr_drop, _ = _mean_std([r.summary.get("train_fraction_dropped") for r in seed_runs])
      paper = PAPER_STEP_TIME.get("l", {}).get(train_cf)
      rows.append([train_cf, eval_cf, _pm(q_mean, q_std),
                   None if d_mean is None else round(100 * d_mean, 2),
                   None if tr_drop is None else round(100 * tr_drop, 2),
                   None if t_mean is None else round(t_mean, 4),
                   f"{sum(not r.diverged for r in seed_runs)}/{len(seed_runs)}",
                   paper])
      heat_row.append(q_mean if q_mean is not None else float("nan"))
    heat.append(heat_row)
  reporting.plot_heatmap(heat, [f"train {c:g}" for c in config.train_capacity_factors],
                         [f"eval {c:g}" for c in config.eval_capacity_factors],
                         os.path.join(out, "capacity.png"),
                         "Negative log perplexity by capacity factor", value_format="{:.3f}")
  intro = (f"Scale `{config.scale}`, {config.seeds} seed(s), {config.steps} steps of "
           f"{config.batch_size} x ({config.inputs_length} + {config.targets_length}) tokens on "
           f"`{config.task}`, run file `{model_gin_files(config, 'capacity')[-1]}`. Quality: "
           f"negative log perplexity on the validation split ({config.eval_steps} batches). "
           "Dropped: fraction of (token, expert) assignments over capacity, mean over the sparse "
           "layers, in evaluation at the eval factor and (last quarter of) training at the train "
           f"factor. Step time: seconds per training step from tokens/s ({config.jobs} run(s) "
           "at once on a shared machine: compare the rows with each other). "
           "Paper step time: ST-MoE-L on TPU (2.397 s at 1.25, 2.447 s at 2.0; none given "
           "for 1.0).")
  headers = ["train CF", "eval CF", "quality", "dropped % (eval)", "dropped % (train)",
             "step time (s)", "stable runs", "step time ST-MoE-L (paper, s)"]
  return write_table(out, "capacity", headers, rows, intro, runs, "![quality](capacity.png)")


def _capacity_run(config, train_cf, seed, runs_dir):
  run_id = f"default_cf{train_cf:g}_seed{seed}"
  params = common_params(config, seed) + [f"capacity_factor_train = {train_cf}",
                                          f"st_moe.SparseFFN.capacity_factor_train = {train_cf}"]
  return Run(run_id, model_gin_files(config, "capacity"), params, os.path.join(runs_dir, run_id))


def entropy(config: Config, show=print, trace_fn=None):
  """Router entropy per sparse layer (encoder, decoder) of the default model, with ln E."""
  out = os.path.join(config.out, "entropy")
  runs_dir = os.path.join(config.out, "runs")
  runs = [_capacity_run(config, 1.25, seed, runs_dir)  # the default model: shared with capacity
          for seed in range(config.seeds)]

  def prepare(run, show_line):
    train(run, config, show_line)
    if run.diverged:
      return None
    seed = runs.index(run)
    summaries = (trace_fn or trace_routing)(run, config, os.path.join(out, f"trace_seed{seed}"),
                                            show_line)
    run.summary["eval_command_trace"] = summaries["command"]
    return summaries["layers"]

  per_seed = [layers for layers in each_run(runs, prepare, config.jobs, show) if layers]
  if not per_seed:
    raise RuntimeError("entropy: every run diverged; nothing to trace")
  by_stack = {"encoder": [], "decoder": []}
  for i, layer in enumerate(per_seed[0]):
    by_stack[layer["stack"]].append(i)
  n = max(len(v) for v in by_stack.values())
  rows = []
  uniform0 = per_seed[0][0]["uniform_entropy"]
  for j in range(max(n, 6)):
    row = [j + 1]
    for stack in ("encoder", "decoder"):
      idx = by_stack[stack]
      if j < len(idx):
        vals = [layers[idx[j]]["router_entropy"] for layers in per_seed]
        mean, std = _mean_std(vals)
        row.append(_pm(mean, std, 2) if len(vals) > 1 else round(mean, 3))
      else:
        row.append(None)
    for stack in ("encoder", "decoder"):
      row.append(PAPER_ENTROPY[stack][j] if j < 6 else None)
    for stack in ("encoder", "decoder"):  # entropy / ln E, ours then the paper's
      ours = by_stack[stack]
      mine = (f"{_mean_std([l[ours[j]]['router_entropy'] for l in per_seed])[0] / uniform0:.2f}"
              if j < len(ours) else "-")
      paper = f"{PAPER_ENTROPY[stack][j] / PAPER_ENTROPY['uniform']:.2f}" if j < 6 else "-"
      row.append(f"{mine} / {paper}")
    rows.append(row)
  uniform = per_seed[0][0]["uniform_entropy"]
  num_experts = per_seed[0][0]["num_experts"]
  rows.append(["uniform bound (ln E)", round(uniform, 3), round(uniform, 3),
               round(PAPER_ENTROPY["uniform"], 2), round(PAPER_ENTROPY["uniform"], 2),
               "1 / 1", "1 / 1"])
  curves = {}
  for stack in ("encoder", "decoder"):
    idx = by_stack[stack]
    curves[f"{stack} (ours)"] = (list(range(1, len(idx) + 1)),
                                 [_mean_std([l[i]["router_entropy"] for l in per_seed])[0]
                                  for i in idx])
    curves[f"{stack} (paper)"] = (list(range(1, 7)), PAPER_ENTROPY[stack])
  curves["ln E (ours)"] = (list(range(1, n + 1)), [uniform] * n)
  curves["ln 32 (paper)"] = (list(range(1, 7)), [PAPER_ENTROPY["uniform"]] * 6)
  reporting.plot_curves(curves, os.path.join(out, "entropy.png"),
                        "Router entropy per sparse layer", ylabel="nats", xlabel="sparse layer")
  intro = (f"Scale `{config.scale}` ({num_experts} experts, {n} sparse layers per stack), "
           f"{config.seeds} seed(s), {config.steps} steps; the traced model is the capacity "
           f"table's run at train capacity factor 1.25 (same run folder), traced on "
           f"{config.trace_tokens} validation tokens at eval capacity factor 2.0 with "
           "tools/trace_routing.py. Router entropy: mean over tokens of the entropy of the "
           "router's softmax over experts (nats), bounded by ln E. Paper: ST-MoE-32B-like "
           "model, 32 experts, 6 sparse layers per stack (ln 32 = 3.47).")
  headers = ["sparse layer", "encoder (ours)", "decoder (ours)", "encoder (paper)",
             "decoder (paper)", "encoder / ln E (ours / paper)",
             "decoder / ln E (ours / paper)"]
  return write_table(out, "entropy", headers, rows, intro, runs, "![entropy](entropy.png)")


def trace_routing(run: Run, config: Config, trace_dir, show=print):
  """Runs tools/trace_routing.py on a run (cached); returns {"layers": [...], "command": str}."""
  json_path = os.path.join(trace_dir, "routing.json")
  meta_path = os.path.join(trace_dir, "trace_meta.json")
  step = runner.latest_checkpoint_step(run.model_dir)
  meta = runner.read_json(meta_path)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  model_files = [g for g in run.gin_files if g not in ("dataset.gin",)]
  cmd = [sys.executable, os.path.join(repo, "tools", "trace_routing.py")]
  cmd += [f"--gin_file={g}" for g in model_files]
  cmd += [f"--gin_param={p}" for p in run.params if not p.startswith("MIXTURE_NAME")]
  cmd += [f"--model_dir={run.model_dir}", f"--task={config.task}", "--split=validation",
          f"--num_tokens={config.trace_tokens}", f"--inputs_length={config.inputs_length}",
          f"--targets_length={config.targets_length}", "--capacity_factor=2.0",
          f"--out={trace_dir}"]
  if not (meta and meta.get("step") == step and os.path.exists(json_path)):
    show(f"[{run.run_id}] tracing routing at step {step}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"trace_routing failed for {run.run_id}:\n{proc.stderr[-3000:]}")
    runner.write_json(meta_path, {"step": step})
  with open(json_path) as f:
    layers = json.load(f)
  return {"layers": layers, "command": runner.shell_quote(cmd)}


def run_table(table, config: Config, show=print):
  validate(table, config)
  return {"stability": stability, "capacity": capacity, "entropy": entropy}[table](config, show)
