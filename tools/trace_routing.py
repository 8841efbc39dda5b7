r"""Trace the routing of a trained ST-MoE: which experts each token goes to, layer by layer.

  trace_routing.py --model_dir=demo_out/st_moe_tiny --task=st_moe_embedded_span_corruption \
      --split=validation --num_tokens=2048 --out=demo_out/routing

The model (its gin configuration and sequence lengths) comes from the operative_config.gin that
t5_mesh_transformer wrote to --model_dir; --gin_file and --gin_param (repeatable, as in
t5_mesh_transformer) are parsed on top, e.g. --gin_file=cpu.gin for a TPU-trained model, and are
needed only for a folder without an operative config. --inputs_length / --targets_length override
the lengths. Exactly --num_tokens encoder tokens are traced (the decoder tokens of the same rows
with them).

The tracer evaluates the model (mode "eval"): --capacity_factor_eval sets the sparse layers'
evaluation capacity factor, at which the dropped fraction is measured, and --second_policy_eval
their second-expert policy, "threshold" by default so that tracing the same checkpoint twice gives
the same result ("random", the models' setting, samples which second choices are kept).

--compare_checkpoint traces the same tokens at a second checkpoint of the model (an earlier
step, say) and reports, per layer, how many tokens still go to the same first expert: a router
that keeps reassigning tokens makes its experts learn from changing data.

--seed fixes the task's random preprocessing, so the same tokens are read each time;
--module_import (repeatable) imports a module first, e.g. the one that registers your own task.

Writes routing.md, routing.json and PNG charts to --out (local or gs://), and prints the table.
"""
import importlib
import os

from absl import app
from absl import flags
# Defines --gin_file and --gin_param (repeatable), as t5_mesh_transformer has them.
from mesh_tensorflow.transformer import utils as _mtf_utils  # pylint: disable=unused-import

from st_moe import routing
from st_moe.analysis import tracing
from st_moe.experiments import checkpoints

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Folder with the checkpoint (and operative_config.gin).")
flags.DEFINE_string("checkpoint", None, "A specific checkpoint path (default: the latest).")
flags.DEFINE_string("task", "st_moe_embedded_span_corruption", "SeqIO task (or mixture) to read.")
flags.DEFINE_string("split", "validation", "Split of the task.")
flags.DEFINE_integer("num_tokens", 2048, "Encoder tokens to trace (non-padding).")
flags.DEFINE_integer("batch_size", 8, "Sequences per batch.")
flags.DEFINE_integer("inputs_length", None,
                     "Encoder length (default: utils.run.sequence_length of the model's config).")
flags.DEFINE_integer("targets_length", None,
                     "Decoder length (default: utils.run.sequence_length of the model's config).")
flags.DEFINE_float("capacity_factor_eval", None,
                   "Evaluation capacity factor of the sparse layers (default: the model's).")
flags.DEFINE_enum("second_policy_eval", tracing.DETERMINISTIC_SECOND_POLICY,
                  list(routing.SECOND_POLICIES) + ["model"],
                  "Second-expert policy while tracing; 'model' keeps the model's (random in the "
                  "project's gin files: not reproducible).")
flags.DEFINE_integer("seed", 0, "Seed of the task's random preprocessing (span corruption).")
flags.DEFINE_multi_string("module_import", None, "Modules to import first, e.g. the module that "
                          "registers your own task (as t5_mesh_transformer's --module_import).")
flags.DEFINE_string("compare_checkpoint", None,
                    "Another checkpoint of the same model (e.g. an earlier step's): the same "
                    "tokens are traced there too, and each layer reports the % of tokens whose "
                    "first expert is the same at both (how much of the routing changed).")
flags.DEFINE_string("out", "routing_trace", "Output folder.")


def main(argv):
  del argv
  if not FLAGS.model_dir and not FLAGS.checkpoint:
    raise app.UsageError("--model_dir: give the folder of a trained model's checkpoints")
  if FLAGS.num_tokens < 1:
    raise app.UsageError(f"--num_tokens={FLAGS.num_tokens}: must be at least 1")
  if FLAGS.batch_size < 1:
    raise app.UsageError(f"--batch_size={FLAGS.batch_size}: must be at least 1")
  if not tracing.model_dir_config(FLAGS.model_dir) and not FLAGS.gin_file:
    raise app.UsageError(
        f"--model_dir={FLAGS.model_dir}: no {tracing.OPERATIVE_CONFIG} there; give the model's "
        "gin files, e.g. --gin_file=st_moe_tiny.gin --gin_file=cpu.gin")
  if (FLAGS.inputs_length is None) != (FLAGS.targets_length is None):
    raise app.UsageError(f"--inputs_length={FLAGS.inputs_length} --targets_length="
                         f"{FLAGS.targets_length}: give both or neither (neither: the model's)")
  for name in ("inputs_length", "targets_length"):
    if getattr(FLAGS, name) is not None and getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: must be at least 1")
  for name in ("checkpoint", "compare_checkpoint"):
    path = getattr(FLAGS, name)
    reason = path and checkpoints.readable(path)
    if reason:
      raise app.UsageError(f"--{name}={path}: no such checkpoint can be read ({reason}); give a "
                           "checkpoint's path without its suffix, e.g. <model_dir>/model.ckpt-1000")
  params = list(FLAGS.gin_param or [])
  if FLAGS.capacity_factor_eval is not None:
    if not FLAGS.capacity_factor_eval > 0:
      raise app.UsageError(f"--capacity_factor_eval={FLAGS.capacity_factor_eval}: must be > 0 "
                           "(the models evaluate at 2.0)")
    params.append(f"st_moe.SparseFFN.capacity_factor_eval = {FLAGS.capacity_factor_eval}")
  sequence_length = None
  if FLAGS.inputs_length:
    sequence_length = {"inputs": FLAGS.inputs_length, "targets": FLAGS.targets_length}
  for module in FLAGS.module_import or []:
    importlib.import_module(module)
  policy = None if FLAGS.second_policy_eval == "model" else FLAGS.second_policy_eval

  # Both checkpoints in one graph and one session, on one read of the task's tokens.
  paths = [tracing.checkpoint_to_trace(FLAGS.model_dir, FLAGS.checkpoint)]
  if FLAGS.compare_checkpoint:
    paths.append(FLAGS.compare_checkpoint)
  per_checkpoint, vocabulary = tracing.trace_checkpoints(
      FLAGS.gin_file or [], params, FLAGS.model_dir, FLAGS.task, paths, split=FLAGS.split,
      num_tokens=FLAGS.num_tokens, batch_size=FLAGS.batch_size, sequence_length=sequence_length,
      second_policy_eval=policy, seed=FLAGS.seed)
  traces = per_checkpoint[0]
  summaries = [tracing.analyse(t, vocabulary) for t in traces]
  if FLAGS.compare_checkpoint:
    tracing.add_agreement(summaries, traces, per_checkpoint[1], FLAGS.compare_checkpoint)
  text = tracing.write_report(summaries, FLAGS.out,
                              title=f"Routing of {FLAGS.task}:{FLAGS.split}")
  print(text)
  print(f"wrote {os.path.join(FLAGS.out, 'routing.md')}")


if __name__ == "__main__":
  app.run(main)
