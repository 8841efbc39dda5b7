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
