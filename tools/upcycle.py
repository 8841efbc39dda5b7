r"""Sparse upcycling: writes an ST-MoE checkpoint made from a dense T5.1.1 checkpoint.

Every expert of a sparse layer starts as a copy of the dense FFN it replaces, the routers are new,
everything else is copied under its new name (st_moe/upcycling.py says how, and why). The output
is a checkpoint for `utils.run.init_checkpoint` (finetune.gin, or any run file):

  python tools/upcycle.py \
    --dense_checkpoint=gs://t5-data/pretrained_models/t5.1.1.large/model.ckpt-1000000 \
    --gin_file=st_moe_l.gin --out=gs://my-bucket/st_moe_l_upcycled
  # -> gs://my-bucket/st_moe_l_upcycled/model.ckpt-1000000 (+ upcycle.json, the record)

Flags:
  --dense_checkpoint  a checkpoint prefix, or a directory (its latest checkpoint); gs:// works.
  --gin_file / --gin_param  the sparse model, as for t5_mesh_transformer (sizes must match the
                      dense checkpoint's; a layout or run file may be given, they change nothing
                      but the optimizer settings that decide the slots' shapes).
  --out               the output directory; gs:// works.
  --vocab_size        the vocabulary before padding (default 32100, T5's SentencePiece + 100
                      sentinels = 32128 rows, as in the T5.1.1 checkpoints).
  --extra_dense_ffn   identity (default: copied wi, zero output kernel, the function unchanged)
                      | copy (the block's dense FFN copied whole).
  --optimizer_slots   tile (default: Adafactor slots copied, tiled over experts) | drop.
  --step              keep (default: the dense checkpoint's global step, schedules continue) | N.
  --seed              seeds the routers' normal(0, router_init_stddev) initialiser.
  --overwrite         replace an existing model.ckpt-<step> in --out.
  --dry_run           check and print the plan only (reads the dense variable list; writes nothing).

A model that cannot be upcycled from the checkpoint (d_model, d_ff, heads, layers, vocabulary)
fails before anything is written, naming the variable and both shapes.
"""
import json
import sys

from absl import app
from absl import flags

from st_moe import upcycling

FLAGS = flags.FLAGS


def _define_flags():
  # mesh_tensorflow.transformer.utils (imported by st_moe.analysis.model_graph) defines these
  # when it is imported first.
  if "gin_file" not in FLAGS:
    flags.DEFINE_multi_string("gin_file", None, "Gin file of the sparse model (bare names "
                              "resolve in gin/).")
  if "gin_param" not in FLAGS:
    flags.DEFINE_multi_string("gin_param", None, "Gin binding, e.g. 'num_experts = 8'.")
  flags.DEFINE_string("dense_checkpoint", None, "Dense Mesh-TF checkpoint (prefix or directory).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("vocab_size", 32100, "Vocabulary size before padding.")
  flags.DEFINE_enum("extra_dense_ffn", "identity", list(upcycling.EXTRA_DENSE_FFN),
                    "The extra dense FFN of each sparse block.")
  flags.DEFINE_enum("optimizer_slots", "tile", list(upcycling.OPTIMIZER_SLOTS),
                    "Adafactor slots: tiled over experts, or dropped.")
  flags.DEFINE_string("step", "keep", "'keep' (the dense checkpoint's global step) or an integer.")
  flags.DEFINE_integer("seed", 0, "Seed of the routers' initialiser.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint of the same step.")
  flags.DEFINE_bool("dry_run", False, "Check and plan only; write nothing.")


_define_flags()


def _step(value):
  if value == "keep":
    return value
  try:
    return int(value)
  except ValueError:
    raise upcycling.UpcycleError(f"--step={value!r}: expected 'keep' or an integer >= 0") from None


def main(argv):
  del argv
  for name in ("dense_checkpoint", "out", "gin_file"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  try:
    prefix, the_plan = upcycling.upcycle(
        FLAGS.dense_checkpoint, FLAGS.gin_file, FLAGS.out, gin_params=FLAGS.gin_param or [],
        vocab_size=FLAGS.vocab_size, extra_dense_ffn=FLAGS.extra_dense_ffn,
        optimizer_slots=FLAGS.optimizer_slots, step=_step(FLAGS.step), seed=FLAGS.seed,
        overwrite=FLAGS.overwrite, dry_run=FLAGS.dry_run)
  except upcycling.UpcycleError as e:
    print(f"upcycle: error: {e}", file=sys.stderr)
    return 1
  for note in the_plan.notes:
    print(f"note: {note}")
  if FLAGS.dry_run:
    for entry in the_plan.entries:
      print(f"{entry.name} {entry.shape} <- {entry.how} {entry.source or ''}".rstrip())
    print("variables planned: " + json.dumps(the_plan.counts(), sort_keys=True))
    print(f"would write {prefix} (global step {the_plan.step})")
    return 0
  print("variables written: " + json.dumps(the_plan.counts(), sort_keys=True))
  print(f"wrote {prefix} (global step {the_plan.step})")
  print(f"use: --gin_param=\"utils.run.init_checkpoint = '{prefix}'\"")
  return 0


if __name__ == "__main__":
  app.run(main)
