"""Trace the routing of a trained ST-MoE: which experts each token goes to, layer by layer.

  python tools/trace_routing.py --gin_file=st_moe_tiny.gin --gin_file=cpu.gin \
      --model_dir=demo_out/st_moe_tiny --task=st_moe_embedded_span_corruption \
      --split=validation --num_tokens=2048 --out=demo_out/routing

Works on any checkpoint of the project's models: give the same model gin files (and --gin_param
overrides) the model was trained with. Writes routing.md, routing.json and PNG heat maps to --out,
and prints the per-layer table. --capacity_factor sets the sparse layers' evaluation capacity
factor (the tracer runs the model in evaluation mode); the dropped fraction is measured at it.
"""
import os
import sys

from absl import app
from absl import flags
# Defines --gin_file and --gin_param (repeatable), as t5_mesh_transformer has them.
from mesh_tensorflow.transformer import utils as _mtf_utils  # pylint: disable=unused-import


from st_moe.analysis import tracing  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Folder with the checkpoint to trace.")
flags.DEFINE_string("checkpoint", None, "A specific checkpoint path (default: the latest).")
flags.DEFINE_string("task", "st_moe_embedded_span_corruption", "SeqIO task (or mixture) to read.")
flags.DEFINE_string("split", "validation", "Split of the task.")
flags.DEFINE_integer("num_tokens", 2048, "Encoder tokens to trace (non-padding).")
flags.DEFINE_integer("batch_size", 8, "Sequences per batch.")
flags.DEFINE_integer("inputs_length", None, "Encoder length (default: utils.run's, else 128).")
flags.DEFINE_integer("targets_length", None, "Decoder length (default: utils.run's, else 32).")
flags.DEFINE_float("capacity_factor", None, "Evaluation capacity factor of the sparse layers.")
flags.DEFINE_string("out", "routing_trace", "Output folder.")


def main(argv):
  del argv
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file: give the model's gin files, e.g. --gin_file=st_moe_tiny.gin")
  if not FLAGS.model_dir and not FLAGS.checkpoint:
    raise app.UsageError("--model_dir: give the folder of a trained model's checkpoints")
  if FLAGS.num_tokens < 1:
    raise app.UsageError(f"--num_tokens={FLAGS.num_tokens}: must be at least 1")
  params = list(FLAGS.gin_param or [])
  if FLAGS.capacity_factor is not None:
    if FLAGS.capacity_factor <= 0:
      raise app.UsageError(f"--capacity_factor={FLAGS.capacity_factor}: must be > 0")
    params.append(f"st_moe.SparseFFN.capacity_factor_eval = {FLAGS.capacity_factor}")
  sequence_length = None
  if FLAGS.inputs_length or FLAGS.targets_length:
    sequence_length = {"inputs": FLAGS.inputs_length or 128, "targets": FLAGS.targets_length or 32}
  traces, vocabulary = tracing.trace(
      FLAGS.gin_file, params, FLAGS.model_dir, FLAGS.task, FLAGS.split, FLAGS.num_tokens,
      FLAGS.batch_size, sequence_length, FLAGS.checkpoint)
  summaries = [tracing.analyse(t, vocabulary) for t in traces]
  text = tracing.write_report(summaries, FLAGS.out,
                              title=f"Routing of {FLAGS.task}:{FLAGS.split}")
  print(text)
  print(f"wrote {os.path.join(FLAGS.out, 'routing.md')}")


if __name__ == "__main__":
  app.run(main)
