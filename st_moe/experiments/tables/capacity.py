"""Capacity factors (ST-MoE, arXiv 2202.08906, Sec. 4 and Table 4's discussion): quality, tokens
dropped and step time on a grid of train x eval capacity factors.

One run per (train factor, seed); every run is evaluated at every eval factor. The fraction of
tokens dropped in evaluation is counted by the routing tracer (st_moe.analysis.tracing) at each
eval factor on `trace_tokens` validation tokens (CPU scales only: the tracer runs on the CPU); in
training it is the layers' own summary over the last quarter of the steps.
"""
from st_moe.analysis import reporting
from st_moe.experiments import jobs
from st_moe.experiments.tables import common

# Paper's step times (s) against train capacity factor [ST-MoE Table 4 discussion].
PAPER_STEP_TIME = {"l": {1.25: 2.397, 2.0: 2.447}, "32b": {1.25: 4.244, 2.0: 4.819}}
HEADERS = ["train CF", "eval CF", "quality", "dropped % (eval)", "dropped % (train)",
           "step time (s)", "stable runs", "step time ST-MoE-L (paper, s)"]


def make_run(config: common.Config, capacity_factor_train, seed) -> common.Run:
  """The default model at one train capacity factor (shared with the entropy table)."""
  return common.make_run(config, f"default_cf{capacity_factor_train:g}_seed{seed}", "capacity",
                         seed, jobs.capacity_params(capacity_factor_train=capacity_factor_train))


def _dropped(layers):
  """Mean over the sparse layers of the traced fraction of (token, choice) pairs dropped."""
  values = [layer["fraction_dropped"] for layer in layers or []]
  return sum(values) / len(values) if values else None


def _percent(value):
  return None if value is None else round(100 * value, 2)


def table(config: common.Config, show=print):
  """Trains, evaluates (and traces) the grid and writes the capacity table; returns its path."""
  out = jobs.join(config.out, "capacity")
  runs = {(cf, seed): make_run(config, cf, seed)
          for cf in config.capacity_factors_train for seed in range(config.seeds)}

  def prepare(run, show_line):
    common.train(run, config, show_line)
    if run.diverged:
      return {}
    found = {cf: dict(common.evaluate(run, config, cf, show_line))
             for cf in config.capacity_factors_eval}
    if config.scale in common.CPU_SCALES:
      traced = common.trace(run, config, config.capacity_factors_eval, show_line)
      for cf in found:
        found[cf]["eval_fraction_dropped"] = _dropped(traced[cf]["layers"])
    return found

  common.check_evaluations([(run, cf) for run in runs.values()
                            for cf in config.capacity_factors_eval], config)
  evals = dict(zip(runs, jobs.run_all(list(runs.values()), prepare, config.jobs, show)))
  rows, grid = [], []
  for train_cf in config.capacity_factors_train:
    seed_runs = [runs[(train_cf, seed)] for seed in range(config.seeds)]
    grid.append([])
    for eval_cf in config.capacity_factors_eval:
      found = [evals[(train_cf, seed)][eval_cf] for seed in range(config.seeds)
               if eval_cf in evals[(train_cf, seed)]]
      quality = [ev["neg_log_perplexity"] for ev in found]
      d_mean, _ = jobs.mean_std([ev.get("eval_fraction_dropped") for ev in found])
      t_mean, _ = jobs.mean_std([r.summary.get("step_seconds") for r in seed_runs])
      tr_drop, _ = jobs.mean_std([r.summary.get("train_fraction_dropped") for r in seed_runs])
      rows.append([train_cf, eval_cf, common.pm(quality), _percent(d_mean), _percent(tr_drop),
                   None if t_mean is None else round(t_mean, 4),
                   f"{sum(not r.diverged for r in seed_runs)}/{len(seed_runs)}",
                   PAPER_STEP_TIME["l"].get(train_cf)])
      grid[-1].append(quality)
  reporting.plot_capacity_grid(grid, config.capacity_factors_train, config.capacity_factors_eval,
                               jobs.join(out, "capacity.png"),
                               "Negative log perplexity by capacity factor")
  intro = (f"Scale `{config.scale}`, {config.seeds} seed(s), {config.steps} steps of "
           f"{config.batch_size} x ({config.inputs_length} + {config.targets_length}) tokens on "
           f"`{config.task}`, run file `{common.model_gin_files(config, 'capacity')[-1]}`. "
           f"Quality: negative log perplexity on the validation split ({config.eval_steps} "
           "batches). Dropped: fraction of (token, expert) assignments over capacity, mean over "
           "the sparse layers; in evaluation counted by the routing tracer on "
           f"{config.trace_tokens} validation tokens at the eval factor (CPU scales only), in "
           "training the layers' summary over the last quarter of the steps at the train "
           f"factor. Step time: seconds per training step from tokens/s ({config.jobs} run(s) "
           "at once on a shared machine: compare the rows with each other). "
           "Paper step time: ST-MoE-L on TPU (2.397 s at 1.25, 2.447 s at 2.0; none given "
           "for 1.0).")
  return common.write_table(out, "capacity", HEADERS, rows, intro, list(runs.values()),
                            "![quality](capacity.png)")
