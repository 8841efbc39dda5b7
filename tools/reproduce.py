"""Reproduce the paper's tables (ST-MoE, arXiv 2202.08906): stability study, capacity, entropy.

  python tools/reproduce.py stability --scale=tiny --seeds=3 --out=reproduction_out
  python tools/reproduce.py capacity  --scale=tiny --out=reproduction_out
  python tools/reproduce.py entropy   --scale=tiny --out=reproduction_out
  python tools/reproduce.py stability --scale=l --tpu=NAME --gcp_project=P --tpu_zone=Z \
      --out=gs://bucket/repro --steps=... (TPU pod; --tpu* flags go to t5_mesh_transformer)

Each table is written to <out>/<table>/<table>.{md,csv,png} with <table>_commands.md (the gin files
and exact command lines of every run). Runs live in <out>/runs/<run id>; rerunning skips finished
runs and resumes unfinished ones. Tables run at scale `tiny` on the CPU with st_moe_tiny.gin and the
run files gin/runs/stability_tiny.gin (constant learning rate 0.3, to make the baseline unstable)
and gin/runs/reproduce_tiny.gin (the default schedule).
"""
import os
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from st_moe.experiments import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe.experiments import runner  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_enum("scale", "tiny", list(reproduce.SCALES), "Model scale.")
flags.DEFINE_integer("seeds", None, "Seeds per variant (default: 3 for stability, 1 otherwise).")
flags.DEFINE_integer("steps", None, "Training steps per run (default: 200 at tiny scale).")
flags.DEFINE_string("out", os.path.join(REPO, "reproduction_out"), "Output folder.")
flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: 16 at tiny scale).")
flags.DEFINE_integer("inputs_length", None, "Encoder length (default: 64 at tiny scale).")
flags.DEFINE_integer("targets_length", None, "Decoder length (default: 16 at tiny scale).")
flags.DEFINE_integer("eval_steps", None, "Validation batches per evaluation (default: 5).")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints (resume granularity).")
flags.DEFINE_integer("jobs", None, "Runs trained at once, each its own t5_mesh_transformer process "
                     "(default: 1; for stability 2 at tiny scale on a machine with 2+ cores). "
                     "capacity's step-time column compares runs, so it trains one at a time.")
flags.DEFINE_string("task", reproduce.DEFAULT_TASK, "SeqIO task to train and evaluate on.")
flags.DEFINE_integer("trace_tokens", 2048, "Tokens the routing tracer reads (entropy).")
flags.DEFINE_list("variants", list(reproduce.STABILITY_VARIANTS), "Stability variants to run.")
flags.DEFINE_list("train_capacity_factors", ["1.0", "1.25", "2.0"], "Capacity: train factors.")
flags.DEFINE_list("eval_capacity_factors", ["1.0", "1.25", "2.0"], "Capacity: eval factors.")
flags.DEFINE_multi_string("extra_gin_param", [], "More gin bindings for every run.")
flags.DEFINE_string("tpu", None, "TPU name (scales l, 32b), passed to t5_mesh_transformer.")
flags.DEFINE_string("gcp_project", None, "GCP project of the TPU.")
flags.DEFINE_string("tpu_zone", None, "Zone of the TPU.")

# Defaults per scale: the tiny ones keep stability (3 seeds) within 30 min on 2 CPU cores. A tiny
# run is mostly single-threaded graph building, so two stability runs go side by side there; a TPU
# takes one. capacity (and entropy, which reuses its run) times steps: one run at a time.
SCALE_DEFAULTS = {
    "tiny": dict(steps=200, batch_size=16, inputs_length=64, targets_length=16, eval_steps=5,
                 checkpoint_every=100, jobs=min(2, os.cpu_count() or 1)),
    "l": dict(steps=10000, batch_size=2048, inputs_length=512, targets_length=114, eval_steps=50,
              checkpoint_every=1000, jobs=1),
    "32b": dict(steps=10000, batch_size=2048, inputs_length=512, targets_length=114,
                eval_steps=50, checkpoint_every=1000, jobs=1),
}


def _floats(name, values):
  try:
    return tuple(float(v) for v in values)
  except ValueError as e:
    raise app.UsageError(f"--{name}={','.join(values)}: must be numbers, e.g. 1.0,1.25,2.0") from e


def config_from_flags(table):
  defaults = SCALE_DEFAULTS[FLAGS.scale]
  def pick(name):
    value = getattr(FLAGS, name)
    return defaults[name] if value is None else value
  tpu_flags = []
  for name in ("tpu", "gcp_project", "tpu_zone"):
    if getattr(FLAGS, name):
      tpu_flags.append(f"--{name}={getattr(FLAGS, name)}")
  return reproduce.Config(
      scale=FLAGS.scale, out=FLAGS.out if FLAGS.out.startswith("gs://") else
      os.path.abspath(FLAGS.out),
      seeds=FLAGS.seeds if FLAGS.seeds is not None else (3 if table == "stability" else 1),
      steps=pick("steps"), batch_size=pick("batch_size"), inputs_length=pick("inputs_length"),
      targets_length=pick("targets_length"), eval_steps=pick("eval_steps"),
      checkpoint_every=pick("checkpoint_every"), task=FLAGS.task, trace_tokens=FLAGS.trace_tokens,
      variants=tuple(FLAGS.variants),
      train_capacity_factors=_floats("train_capacity_factors", FLAGS.train_capacity_factors),
      eval_capacity_factors=_floats("eval_capacity_factors", FLAGS.eval_capacity_factors),
      extra_gin_params=tuple(FLAGS.extra_gin_param), tpu_flags=tuple(tpu_flags),
      jobs=(FLAGS.jobs if FLAGS.jobs is not None else
            defaults["jobs"] if table == "stability" else 1))


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"give one TABLE: one of {', '.join(reproduce.TABLES)}")
  table = argv[1]
  config = config_from_flags(table)
  try:
    reproduce.validate(table, config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  start = time.monotonic()
  path = reproduce.run_table(table, config, show=lambda line: print(line, flush=True))
  with open(path) as f:
    print("\n" + f.read())
  print(f"{table}: {path}  ({runner.format_seconds(time.monotonic() - start)})", flush=True)


if __name__ == "__main__":
  app.run(main)
