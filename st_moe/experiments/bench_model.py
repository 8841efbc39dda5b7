"""Model benchmark: steps/s of st_moe_tiny trained by t5_mesh_transformer, with our SparseFFN and
with upstream mesh_tensorflow MoE1D swapped in by gin (st_moe.experiments.runner runs both).

CLI: tools/bench_model.py; results: docs/performance.md.
"""
import os
import sys

from st_moe.experiments import runner


def upstream_gin_params():
  """Gin bindings that swap upstream MoE1D into st_moe_tiny with our layer's settings."""
  return [
      "st_moe.sparse_layer_stack.sparse_ffn_layer = @moe.MoE1D",
      "moe.MoE1D.num_experts = %num_experts",
      "moe.MoE1D.hidden_size = %d_ff",
      "moe.MoE1D.activation = ['gelu', 'linear']",
      "moe.MoE1D.moe_gating = 'top_2'",
      "moe.MoE1D.group_size = %group_size",
      "moe.MoE1D.capacity_factor_train = %capacity_factor_train",
      "moe.MoE1D.capacity_factor_eval = %capacity_factor_eval",
      "moe.MoE1D.second_policy_train = 'random'",
      "moe.MoE1D.second_policy_eval = 'random'",
      "moe.MoE1D.second_threshold_train = 0.2",
      "moe.MoE1D.second_threshold_eval = 0.2",
      "moe.MoE1D.loss_coef = 1e-2",
      "moe.MoE1D.z_loss = 0.1",  # upstream weighs z_loss by loss_coef: 0.1 x 1e-2 = c_z 1e-3
  ]


def benchmark(workdir, task="st_moe_embedded_span_corruption", batch_size=16, inputs_length=128,
              targets_length=32, train_steps=60, gin_params=(), dispatch="gather", show=None):
  """steps/s of st_moe_tiny through t5_mesh_transformer, ours then upstream; returns dicts.

  Args:
    workdir: an empty folder for the two model_dirs ("ours", "upstream").
    task: the SeqIO task (or mixture) trained on.
    batch_size: sequences per step; inputs_length, targets_length: their lengths.
    train_steps: steps per run.
    gin_params: more bindings for both runs.
    dispatch: our layer's dispatch ("gather" or "einsum").
    show: called with each progress line (default: print to stderr).

  Returns:
    [{"model", "layer", "steps", "tokens_per_step", "steps_per_s", "tokens_per_s", "command"}]
    for ours and upstream.

  Raises:
    ValueError: workdir already holds a trained model.
    RuntimeError: a run failed.
  """
  show = show or (lambda line: print(line, file=sys.stderr, flush=True))
  length = {"inputs": inputs_length, "targets": targets_length}
  common = [
      f"MIXTURE_NAME='{task}'",
      f"utils.run.batch_size=('sequences_per_batch', {batch_size})",
      f"utils.run.sequence_length={length!r}",
      f"utils.run.train_steps={train_steps}",
      f"utils.run.save_checkpoints_steps={train_steps}",
      f"utils.run.iterations_per_loop={train_steps}",
  ] + list(gin_params)
  gin_files = ["dataset.gin", "st_moe_tiny.gin", "cpu.gin"]
  tokens = runner.tokens_per_step(batch_size, length)
  results = []
  for name, params in (("ours", [f"st_moe.SparseFFN.dispatch='{dispatch}'"]),
                       ("upstream", upstream_gin_params())):
    model_dir = os.path.join(workdir, name)
    if runner.latest_checkpoint_step(model_dir):
      raise ValueError(f"workdir={workdir!r} already holds a trained {name} model; "
                       "give an empty directory (a resumed run would train no steps)")
    run = runner.run(model_dir, gin_files, common + params, tokens_per_step=tokens, label=name,
                     show=show,
                     module_imports=("mesh_tensorflow.transformer.moe",))
    if not run.ok or not run.tokens_per_second:
      raise RuntimeError(f"the {name} training run failed (return code {run.returncode}); "
                         f"see {run.log_path}")
    results.append({"model": "st_moe_tiny", "layer": name, "steps": len(run.steps),
                    "tokens_per_step": tokens,
                    "steps_per_s": run.tokens_per_second / tokens,
                    "tokens_per_s": run.tokens_per_second,
                    "command": runner.shell_quote(run.command)})
  return results


# ---------------------------------------------------------------------------------------------
# Sparse against dense: the tables' two models at one scale, through the tables' own run files.


def sparse_vs_dense(workdir, scale="small", train_steps=30, rounds=1, gin_params=(), show=None):
  """tokens/s of a scale's sparse model and its FLOP-matched dense twin, one run at a time.

  Each model trains as the sparse_vs_dense table trains it (st_moe.experiments.tables.common:
  the scale's gin files, shape, task and seed 0), for `train_steps` steps, in its own folder.
  Round r runs sparse then dense when r is even, dense then sparse when odd (slow drifts of a
  shared machine fall on both). Throughput is read from the runs' event files (runner.Progress:
  from the second step on, so graph building and start-up are not counted).

  Args:
    workdir: an empty folder; runs go to <workdir>/<model>_r<round>.
    scale: "tiny" or "small" (the CPU scales).
    train_steps: steps per run (>= 3, so that a throughput is measured past the second step).
    rounds: runs per model.
    gin_params: more bindings for both models.
    show: called with each progress line (default: print to stderr).

  Returns:
    {"scale", "train_steps", "rounds", "tokens_per_step", "sparse": [tokens/s per round],
     "dense": [...], "sparse_tokens_per_s", "dense_tokens_per_s" (means), "ratio" (sparse mean /
     dense mean), "commands": {model: command of its first run}}.

  Raises:
    ValueError: a bad setting, before any run; or workdir already holds a trained run.
    RuntimeError: a run failed or measured no throughput.
  """
  # pylint: disable=g-import-not-at-top
  from st_moe.experiments.tables import common
  from st_moe.experiments.tables import sparse_vs_dense as svd_table
  # pylint: enable=g-import-not-at-top
  if scale not in common.CPU_SCALES:
    raise ValueError(f"scale={scale!r}: must be one of {', '.join(common.CPU_SCALES)} (the CPU "
                     "scales; l and 32b train on a TPU pod)")
  if not isinstance(train_steps, int) or train_steps < 3:
    raise ValueError(f"train_steps={train_steps!r}: must be an integer >= 3 (throughput is "
                     "measured from the second step on)")
  if not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f"rounds={rounds!r}: must be an integer >= 1")
  show = show or (lambda line: print(line, file=sys.stderr, flush=True))
  config = common.config_for("sparse_vs_dense", scale)
  shape = config.shape()
  found = {"sparse": [], "dense": []}
  commands = {}
  for r in range(rounds):
    order = ("sparse", "dense") if r % 2 == 0 else ("dense", "sparse")
    for model in order:
      model_dir = os.path.join(workdir, f"{model}_r{r}")
      if runner.latest_checkpoint_step(model_dir):
        raise ValueError(f"workdir={workdir!r} already holds a trained {model} run; give an "
                         "empty directory (a resumed run would train no steps)")
      job = svd_table.make_run(config, model, 0).job  # the table's seed-0 run
      params = job.run_params() + [f"utils.run.train_steps = {train_steps}",
                                   f"utils.run.save_checkpoints_steps = {train_steps}"]
      run = runner.run(model_dir, job.run_files(), params + list(gin_params),
                       tokens_per_step=shape.tokens_per_step(),
                       label=f"{model}_r{r}", every=max(1, train_steps // 3), show=show)
      if not run.ok or not run.tokens_per_second:
        raise RuntimeError(f"the {model} run of round {r} failed (return code "
                           f"{run.returncode}); see {run.log_path}")
      found[model].append(run.tokens_per_second)
      commands.setdefault(model, runner.shell_quote(run.command))
  sparse = sum(found["sparse"]) / rounds
  dense = sum(found["dense"]) / rounds
  return {"scale": scale, "train_steps": train_steps, "rounds": rounds,
          "tokens_per_step": shape.tokens_per_step(), "sparse": found["sparse"],
          "dense": found["dense"], "sparse_tokens_per_s": sparse, "dense_tokens_per_s": dense,
          "ratio": sparse / dense, "commands": commands}
