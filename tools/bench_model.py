r"""Model benchmark: steps/s of st_moe_tiny trained by t5_mesh_transformer with our SparseFFN and
with upstream mesh_tensorflow MoE1D swapped in by gin (st_moe/experiments/bench_model.py).

  bench_model.py --json
  bench_model.py --train_steps=30 --gin_param="num_experts = 16" --gin_param="d_ff = 1024"

The layer-level benchmark is tools/bench_moe.py. Results: docs/performance.md.
"""
import json
import tempfile

from absl import app
from absl import flags

from st_moe.experiments import bench_model

FLAGS = flags.FLAGS
flags.DEFINE_integer("train_steps", 60, "Training steps per run.")
flags.DEFINE_integer("batch_size", 16, "Sequences per batch.")
flags.DEFINE_integer("inputs_length", 128, "Encoder length.")
flags.DEFINE_integer("targets_length", 32, "Decoder length.")
flags.DEFINE_string("task", "st_moe_embedded_span_corruption", "SeqIO task (or mixture).")
flags.DEFINE_multi_string("gin_param", [], "More gin bindings for both runs, e.g. "
                          "--gin_param='num_experts = 16' --gin_param='d_ff = 1024'.")
flags.DEFINE_enum("dispatch", "gather", ["einsum", "gather"], "Our layer's dispatch.")
flags.DEFINE_string("workdir", "", "Empty directory for the two model_dirs (default: a new "
                    "temporary directory).")
flags.DEFINE_bool("json", False, "Print one JSON object per layer.")


def main(argv):
  del argv
  for name in ("train_steps", "batch_size", "inputs_length", "targets_length"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: must be >= 1")
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_model_")
  results = bench_model.benchmark(
      workdir, task=FLAGS.task, batch_size=FLAGS.batch_size, inputs_length=FLAGS.inputs_length,
      targets_length=FLAGS.targets_length, train_steps=FLAGS.train_steps,
      gin_params=FLAGS.gin_param, dispatch=FLAGS.dispatch)
  for r in results:
    print(json.dumps(r) if FLAGS.json else
          f"st_moe_tiny with {r['layer']:8s}: {r['steps_per_s']:6.2f} steps/s "
          f"({r['tokens_per_s']:8.0f} tokens/s)", flush=True)


if __name__ == "__main__":
  app.run(main)
