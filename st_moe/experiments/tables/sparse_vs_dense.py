"""Sparse against its FLOP-matched dense twin (ST-MoE, arXiv 2202.08906, Tables 8 and 10): at equal
steps and equal FLOPs per token, does the sparse model reach a lower validation loss, by more than
the seed-to-seed spread?

`seeds` runs of each model (the scale's sparse model and its dense twin: st_moe_small.gin and
dense_small.gin at --scale=small), the same seeds (data order) for both, every run evaluated on the
validation split at the last checkpoint (negative log perplexity at the eval capacity factor 2.0).
The effect is the difference of the two means; the spread the pooled sample standard deviation of
the runs about their model's mean; "effect / spread" >= 3 is what the issue asks to see.
"""
import math
import re

from st_moe.analysis import reporting
from st_moe.experiments import events
from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments.tables import capacity
from st_moe.experiments.tables import common

MODELS = ("sparse", "dense")
# Paper, Table 8 (C4, 100k steps, 1M tokens per batch, FLOP-matched to T5-Large): Dense-L -1.474,
# top-2 at train CF 1.25 / eval CF 2.0 -1.369, i.e. +0.105; tripling the dense model (Dense-XL,
# -1.384) gains +0.090.
PAPER = {"dense": -1.474, "sparse": -1.369}
HEADERS = ["model", "gin file", "parameters", "FLOPs / token", "validation NLP (ours)",
           "validation NLP per seed", "final train loss", "tokens/s", "wall time / run",
           "stable runs", "NLP (paper, L scale)"]


def make_run(config: common.Config, model, seed) -> common.Run:
  """The sparse model is the capacity table's run at the default train factor 1.25 (one run,
  shared by the capacity, entropy and this table); the dense twin has its own."""
  if model == "sparse":
    return capacity.make_run(config, 1.25, seed)
  return common.make_run(config, f"dense_seed{seed}", "sparse_vs_dense", seed, [], dense=True)


WINDOWS = 10  # the training cross-entropy is shown as the mean over each tenth of the run


def aux_loss_coefs(model_dir):
  """(balance_loss_coef, router_z_loss_coef) of a run, read from its operative_config.gin (the
  macros the model files bind); (0.0, 0.0) where it has none (a dense model); None without an
  operative_config.gin (a run stopped before t5_mesh_transformer wrote it)."""
  path = jobs.join(model_dir, "operative_config.gin")
  if not jobs.exists(path):
    return None
  text = jobs.read_text(path)
  coefs = []
  for name in ("balance_loss_coef", "router_z_loss_coef"):
    found = re.search(rf"^{name} = (\S+)$", text, re.MULTILINE)
    coefs.append(float(found.group(1)) if found else 0.0)
  return tuple(coefs)


def cross_entropy_windows(model_dir, steps, windows=WINDOWS):
  """Mean training cross-entropy (the loss less the weighted auxiliary losses,
  events.cross_entropy_by_step) over each of `windows` equal spans of steps 1..steps; None for a
  span without a step; all None for a run without its operative_config.gin."""
  coefs = aux_loss_coefs(model_dir)
  if coefs is None:
    return [None] * windows
  reader = events.EventReader(model_dir, events.is_loss_or_aux_loss)
  reader.poll()
  by_step = events.cross_entropy_by_step(reader.scalars, *coefs)
  found = []
  for first, last in windows_of(steps, windows):
    values = [v for s, v in by_step.items() if first <= s <= last]
    found.append(sum(values) / len(values) if values else None)
  return found


def windows_of(steps, windows=WINDOWS):
  """[(first step, last step)] of the `windows` equal spans of a run of `steps` steps."""
  return [(steps * w // windows + 1, steps * (w + 1) // windows) for w in range(windows)]


def window_gaps(ce):
  """{model: [per-seed window lists]} -> ({model: mean over seeds per window}, [dense minus
  sparse per window] (> 0: the sparse model ahead))."""
  means = {}
  for model, per_seed in ce.items():
    means[model] = []
    for w in range(WINDOWS):
      values = [seed[w] for seed in per_seed if seed and seed[w] is not None]
      means[model].append(sum(values) / len(values) if values else None)
  gap = [None if None in (d, s) else d - s for d, s in zip(means["dense"], means["sparse"])]
  return means, gap


def window_rows(config, ce):
  """Rows of the training cross-entropy table: {model: [per-seed window lists]} -> the mean over
  seeds per window for each model, and the dense minus sparse difference (> 0: sparse ahead)."""
  means, gap = window_gaps(ce)
  headers = ["steps"] + [f"{first}-{last}" for first, last in windows_of(config.steps)]
  rows = [[f"{model} (mean over seeds)"] + ["" if v is None else f"{v:.4f}" for v in means[model]]
          for model in MODELS]
  rows.append(["sparse ahead by (dense - sparse)"] + ["" if v is None else f"{v:+.4f}"
                                                       for v in gap])
  return headers, rows


def pooled_std(groups):
  """Pooled sample standard deviation of values about their group's mean (None if < 1 dof)."""
  squares, dof = 0.0, 0
  for values in groups:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) >= 2:
      mean = sum(values) / len(values)
      squares += sum((v - mean) ** 2 for v in values)
      dof += len(values) - 1
  return math.sqrt(squares / dof) if dof else None


def verdict(effect, spread):
  """One line on the effect (sparse minus dense NLP) against the spread."""
  if effect is None:
    return "no verdict: a model has no evaluated run"
  if not spread:
    return (f"effect {effect:+.4f} nats; spread unknown (one seed per model): no verdict on "
            "significance")
  ratio = effect / spread
  if ratio >= 3:
    return (f"the sparse model is better by {effect:+.4f} nats = {ratio:.1f} x the seed spread "
            f"({spread:.4f}): the paper's direction holds, beyond 3 standard deviations")
  if effect > 0:
    return (f"the sparse model is better by {effect:+.4f} nats = {ratio:.1f} x the seed spread "
            f"({spread:.4f}): the paper's direction, but under 3 standard deviations")
  return (f"the sparse model is NOT better: {effect:+.4f} nats ({ratio:.1f} x the seed spread "
          f"{spread:.4f}); the paper found +0.105")


def table(config: common.Config, show=print):
  """Trains and evaluates every run and writes the sparse_vs_dense table; returns its path."""
  out = jobs.join(config.out, "sparse_vs_dense")
  runs = {(model, seed): make_run(config, model, seed)
          for model in MODELS for seed in range(config.seeds)}

  def prepare(run, show_line):
    common.train(run, config, show_line)
    if run.diverged:
      return None
    return common.evaluate(run, config, common.DEFAULT_EVAL_CF, show_line)

  common.check_evaluations([(run, common.DEFAULT_EVAL_CF) for run in runs.values()], config)
  evals = dict(zip(runs, jobs.run_all(list(runs.values()), prepare, config.jobs, show)))
  quality = {m: [evals[(m, s)]["neg_log_perplexity"] if evals[(m, s)] else None
                 for s in range(config.seeds)] for m in MODELS}
  rows, curves, validation, ce = [], {}, {}, {}
  for model in MODELS:
    model_runs = [runs[(model, s)] for s in range(config.seeds)]
    gin_file = common.model_gin_files(config, "sparse_vs_dense", dense=model == "dense")[0]
    job = model_runs[0].job
    counted = jobs.count(job.gin_files, job.model_params(), task=config.task,
                         sequence_length=config.sequence_length(),
                         cache_path=jobs.join(out, f"{model}.count.json"))
    tps, _ = jobs.mean_std([r.summary.get("tokens_per_second") for r in model_runs])
    wall, _ = jobs.mean_std([r.summary.get("seconds") for r in model_runs])
    rows.append([
        model, f"`{gin_file}`", f"{counted['total_params'] / 1e6:.2f}M",
        f"{counted['flops_per_token'] / 1e6:.2f}M", common.pm(quality[model], 4),
        ", ".join("" if v is None else f"{v:.4f}" for v in quality[model]),
        common.pm([r.summary.get("final_train_loss") for r in model_runs]),
        None if tps is None else round(tps),
        None if wall is None else runner.format_seconds(wall),
        f"{sum(not r.diverged for r in model_runs)}/{len(model_runs)}", PAPER[model]])
    ce[model] = [cross_entropy_windows(run.model_dir, config.steps) for run in model_runs]
    for seed, run in enumerate(model_runs):
      curves[f"{model} seed {seed}"] = runner.steps_and_losses(run.model_dir)
      if quality[model][seed] is not None:
        validation[f"{model} seed {seed}"] = ([config.steps], [-quality[model][seed]])
  means = {m: jobs.mean_std(quality[m])[0] for m in MODELS}
  effect = (None if None in means.values() else means["sparse"] - means["dense"])
  spread = pooled_std(quality.values())
  reporting.plot_loss_curves(curves, jobs.join(out, "sparse_vs_dense.png"),
                             "Training loss (lines) and validation loss (points), per seed",
                             validation=validation)
  summary = verdict(effect, spread)
  intro = (f"Scale `{config.scale}`, {config.seeds} seed(s) per model (the same seeds, i.e. the "
           f"same data order, for both), {config.steps} steps of {config.batch_size} x "
           f"({config.inputs_length} + {config.targets_length}) tokens on `{config.task}`, "
           "run file "
           f"`{common.model_gin_files(config, 'sparse_vs_dense')[-1]}`. Quality: negative log "
           f"perplexity (NLP, higher is better) on the validation split ({config.eval_steps} "
           f"batches) at eval capacity factor {common.DEFAULT_EVAL_CF:g}, mean +- sample std over "
           "seeds. FLOPs / token: forward FLOPs per token "
           "(tools/count_params.py's count; the twins are FLOP-matched). Wall time: the mean "
           f"training time of a run ({config.jobs} run(s) at once on this machine). The paper's "
           "column: Table 8 (C4, 100k steps of 1M tokens; Dense-L against top-2 ST-MoE-L at train "
           "CF 1.25, eval CF 2.0: +0.105).")
  window_headers, windows = window_rows(config, ce)
  reporting.plot_gap(
      windows_of(config.steps), window_gaps(ce)[1], jobs.join(out, "sparse_vs_dense_gap.png"),
      "Sparse ahead of its dense twin by: training cross-entropy per tenth (bars, dense - "
      "sparse),\nvalidation NLP at the end (point: sparse - dense, +- the pooled seed spread)",
      point=None if effect is None else (config.steps, effect, spread,
                                         "validation NLP, sparse - dense"))
  extra = "\n".join([
      f"**Effect** (sparse minus dense NLP): {'' if effect is None else f'{effect:+.4f}'}; "
      f"**spread** (pooled sample std over seeds): {'' if spread is None else f'{spread:.4f}'}.",
      "", f"Verdict: {summary}.", "",
      "Training cross-entropy over each tenth of the run (the training loss less the sparse "
      "layers' balance and router z-losses times their coefficients, from the event files; one "
      "batch per step, so each window is a mean over its steps and the seeds):", "",
      reporting.markdown_table(window_headers, windows), "",
      "![the gap over training](sparse_vs_dense_gap.png)", "",
      "![loss curves](sparse_vs_dense.png)"])
  jobs.write_json(jobs.join(out, "sparse_vs_dense.json"),
                  {"quality": quality, "effect": effect, "spread": spread, "verdict": summary,
                   "train_cross_entropy_windows": ce})
  return common.write_table(out, "sparse_vs_dense", HEADERS, rows, intro, list(runs.values()),
                            extra)
