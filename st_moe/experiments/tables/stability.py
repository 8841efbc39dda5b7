"""The stability study (ST-MoE, arXiv 2202.08906, Table 3): which techniques keep training stable.

Every variant trains `seeds` seeds at a learning rate high enough to make the baseline unstable
(gin/runs/stability_tiny.gin at scale tiny); a run the divergence rule stops counts as unstable and
is listed with its step; the stable runs are evaluated (negative log perplexity).
"""
import math

from st_moe.analysis import reporting
from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments.tables import common

# name -> (description, gin bindings on top of the scale's base run, paper's (stable, quality)).
# All variants but the last train without router z-loss, as in the paper's table: each row adds one
# stabilisation technique to (or removes one multiplicative interaction from) the baseline.
_NO_SCALE_NORM = ("[@transformer.sublayer_dropout]",
                  "[@st_moe.sublayer_rms_norm_no_scale, @transformer.sublayer_call_layer, "
                  "@transformer.sublayer_dropout, @transformer.sublayer_residual]",
                  "[@st_moe.sublayer_rms_norm_no_scale, @transformer.sublayer_dropout]")
VARIANTS = {
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
HEADERS = ["variant", "change", "stable runs", "quality (ours)", "diverged runs",
           "router z-loss (last step)", "max router logit (last step)", "stable runs (paper)",
           "quality (paper)"]


def variants(config: common.Config):
  return tuple(config.variants) or tuple(VARIANTS)


def validate(config: common.Config):
  unknown = [v for v in variants(config) if v not in VARIANTS]
  if unknown:
    raise ValueError(f"--variants={','.join(unknown)!r}: must be a non-empty list from "
                     f"{', '.join(VARIANTS)}")


def seeds_of(config: common.Config, variant):
  """Seeds a variant trains: --seeds, and for the baseline --baseline_seeds (default twice
  --seeds: the paper's Table 3 ran its baseline on 6 seeds and every variant on 3)."""
  if variant != "baseline":
    return config.seeds
  return config.baseline_seeds or 2 * config.seeds


def plan(config: common.Config):
  """{(variant, seed): Run} of the table."""
  return {(variant, seed): common.make_run(config, f"stability_{variant}_seed{seed}",
                                           "stability", seed, VARIANTS[variant][1])
          for variant in variants(config) for seed in range(seeds_of(config, variant))}


def _last_router_value(runs, variant, seeds: int, key):
  """Mean +- std over the variant's seeds of a router metric at the last step a run logged
  (jobs.train's summary; a diverged run's last finite value counts: it shows the logits' growth);
  empty for a model without sparse layers or without a finite value."""
  values = [runs[(variant, seed)].summary.get(key) for seed in range(seeds)]
  return common.pm([v for v in values if v is not None and math.isfinite(v)])


def rows(config: common.Config, runs, quality):
  """The table's rows from the trained runs {(variant, seed): Run} and {(variant, seed): quality}
  (None for a diverged run)."""
  found = []
  for variant in variants(config):
    description, _, paper = VARIANTS[variant]
    stable_q, diverged_at = [], []
    seeds = seeds_of(config, variant)
    for seed in range(seeds):
      run = runs[(variant, seed)]
      if run.diverged:
        diverged_at.append(f"seed {seed} at step {run.summary.get('diverged_step')}")
      else:
        stable_q.append(quality[(variant, seed)])
    found.append([variant, description, f"{len(stable_q)}/{seeds}", common.pm(stable_q),
                  "; ".join(diverged_at) or "none",
                  _last_router_value(runs, variant, seeds, "router_z_loss"),
                  _last_router_value(runs, variant, seeds, "router_max_logit"),
                  paper[0], paper[1]])
  return found


def table(config: common.Config, show=print):
  """Trains, evaluates and writes the stability table; returns the markdown path."""
  out = jobs.join(config.out, "stability")
  runs = plan(config)

  def prepare(run, show_line):
    common.train(run, config, show_line)
    if run.diverged:
      return None
    return common.evaluate(run, config, common.DEFAULT_EVAL_CF, show_line)["neg_log_perplexity"]

  common.check_evaluations([(run, common.DEFAULT_EVAL_CF) for run in runs.values()], config)
  quality = dict(zip(runs, jobs.run_all(list(runs.values()), prepare, config.jobs, show)))
  panels, stopped = {}, []
  for (variant, seed), run in runs.items():
    panels.setdefault(variant, {})[f"seed {seed}"] = runner.steps_and_losses(run.model_dir)
    if run.diverged:
      stopped.append((variant, f"seed {seed}"))
  finite = [v for c in panels.values() for _, vs in c.values() for v in vs if math.isfinite(v)]
  low = min(finite, default=0.0)
  reporting.plot_panels(panels, jobs.join(out, "stability_curves.png"),
                        f"Training loss per variant and seed ({config.scale}); x = stopped "
                        "as diverged", ylim=(max(0.0, low - 0.5), low + 8.0), stopped=stopped)
  baseline = (f" ({seeds_of(config, 'baseline')} for the baseline)"
              if "baseline" in variants(config) else "")
  intro = (f"Scale `{config.scale}`, {config.seeds} seed(s){baseline} x "
           f"{len(variants(config))} variants, "
           f"{config.steps} steps of {config.batch_size} x ({config.inputs_length} + "
           f"{config.targets_length}) tokens on `{config.task}`; quality = negative log "
           f"perplexity per target token on the validation split ({config.eval_steps} batches), "
           f"mean +- std over the stable seeds. Run file: "
           f"`{common.model_gin_files(config, 'stability')[-1]}`. Divergence rule: "
           "st_moe/experiments/divergence.py (a NaN/inf loss, a loss that stays above its "
           "running minimum by max(1.0, 0.5 |min|), a frozen loss, or a routing collapse); "
           "diverged runs are stopped, listed and not evaluated. Paper columns: ST-MoE Table 3 "
           "(32 experts, 6 seeds for the baseline). Router z-loss: the mean over tokens of the "
           "squared logsumexp of the router logits (unscaled, i.e. before its coefficient), and "
           "max router logit: the largest logit of any token, both at the last training step "
           "logged, averaged over the sparse layers, mean +- std over the seeds (diverged ones "
           "included where finite).")
  intro += (" A seed fixes the data order, the initial weights and mesh_tensorflow's random ops "
            "(st_moe.determinism, with resource variables: st_moe.register), so a rerun of a "
            "seed repeats its run; seeds differ, so compare variants by their spread.")
  return common.write_table(out, "stability", HEADERS, rows(config, runs, quality), intro,
                            list(runs.values()), "![loss curves](stability_curves.png)")
