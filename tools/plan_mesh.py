r"""Checks a model against a mesh layout and estimates per-core memory, on a CPU, without a TPU.

Builds the model's mtf graph from its gin files and a layout file (never lowered) at the run's
batch: every dimension a layout rule splits must be divisible by its mesh dimension (the error
names the dimension otherwise, exit status 1). Prints per-core bytes of parameters, gradients,
Adafactor state and the largest activation of one training microbatch, the experts per core, and
whether they fit --core_memory_gib (16, a TPU v3 core). See st_moe/planning.py.

  python tools/plan_mesh.py --gin_file=st_moe_32b.gin --gin_file=tpu_v3_1024_dp64_mp16.gin \
      --gin_file=pretrain_c4.gin
  python tools/plan_mesh.py --gin_file=st_moe_l.gin --gin_file=tpu_v3_32_dp32.gin --json
"""
import json
import sys

from absl import app
from absl import flags
from absl import logging

from st_moe.analysis import model_graph
from st_moe.analysis import planning

FLAGS = flags.FLAGS


def _define_flags():
  # mesh_tensorflow.transformer.utils (imported by model_graph) defines --gin_file/--gin_param.
  if "gin_file" not in FLAGS:
    flags.DEFINE_multi_string("gin_file", None, "Gin file (bare names resolve in gin/).")
  if "gin_param" not in FLAGS:
    flags.DEFINE_multi_string("gin_param", None, "Gin binding.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.DEFINE_float("core_memory_gib", planning.TPU_V3_CORE_GIB,
                     "Memory of one core in GiB (TPU v3: 16).")
  flags.DEFINE_integer("batch_size", None, "Sequences per step; default: utils.run's, from gin.")
  flags.DEFINE_integer("vocab_size", model_graph.T5_VOCAB_SIZE,
                       "Vocabulary size before padding (T5 SentencePiece + 100 sentinels).")


_define_flags()


def _gib(n):
  return f"{n / planning.GIB:8.3f} GiB"


def report(p):
  lines = [
      f"mesh_shape {p.mesh_shape} ({p.num_cores} cores), layout_rules {p.layout_rules}",
      f"batch {p.batch_size} sequences in {p.num_microbatches} microbatch(es) of "
      f"{p.microbatch_size}",
      "per core:",
      f"  parameters (float32 slices)  {_gib(p.param_bytes)}",
      f"  gradients                    {_gib(p.gradient_bytes)}",
      f"  Adafactor state              {_gib(p.adafactor_bytes)}",
      f"  largest activation           {_gib(p.largest_activation_bytes)}  "
      f"({p.largest_activation})",
      f"  total                        {_gib(p.total_bytes)} of {_gib(p.core_memory_bytes)}: "
      + ("fits" if p.fits else "DOES NOT FIT"),
  ]
  if p.num_experts:
    where = (f"split over mesh dimension '{p.experts_split_over}'" if p.experts_split_over
             else "not split: every core holds all of them")
    lines.append(f"experts: {p.num_experts} per sparse layer, {p.experts_per_core} per core "
                 f"({where})")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required: a model file and a layout file")
  model_graph.parse_gin(FLAGS.gin_file, FLAGS.gin_param or [])
  mesh_shape, layout_rules = model_graph.gin_mesh_and_layout()
  sequence_length = (model_graph.query("utils.run.sequence_length", None)
                     or model_graph.DEFAULT_SEQUENCE_LENGTH)
  try:
    batch_size, num_microbatches = planning.run_batch(sequence_length, mesh_shape, layout_rules,
                                                      FLAGS.batch_size)
    graph = model_graph.build(vocab_size=FLAGS.vocab_size,
                              batch_size=batch_size // num_microbatches,
                              sequence_length=sequence_length)
    plan = planning.plan(graph, batch_size, num_microbatches, FLAGS.core_memory_gib)
  except ValueError as e:  # LayoutError, or a layer refusing the layout while the graph is built
    print(f"plan_mesh: error: {e}", file=sys.stderr)
    sys.exit(1)
  if FLAGS.json:
    print(json.dumps(plan.as_dict(), sort_keys=True))
  else:
    print(report(plan))


if __name__ == "__main__":
  app.run(main)
