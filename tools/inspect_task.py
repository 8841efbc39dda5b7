"""Shows a few processed examples of a registered st-moe task (like t5's dump_task).

  python tools/inspect_task.py --task=st_moe_embedded_span_corruption --split=validation --n=3
  python tools/inspect_task.py --task=st_moe_super_glue_boolq --vocabulary=embedded --mock_data
  python tools/inspect_task.py --module_import=my_tasks --task=my_task --split=train

`--module_import` (repeatable, as in t5_mesh_transformer) imports the module that registers your
own task first; the module must be importable (installed, or on PYTHONPATH).

Prints, per example, the text before tokenization (when the task keeps it), the token ids and the
decoded inputs and targets. `--vocabulary=embedded|bytes` runs the same task definition with a local
vocabulary (T5's default cannot be downloaded everywhere); `--mock_data` feeds TFDS tasks random
examples from `tfds.testing.mock_data` instead of prepared data.
"""
import contextlib
import importlib
import sys

from absl import app
from absl import flags
import seqio

import st_moe.tasks
from st_moe.tasks import families

FLAGS = flags.FLAGS
flags.DEFINE_string("task", None, "Registered task name, e.g. st_moe_super_glue_boolq.")
flags.DEFINE_string("split", "validation", "Split to read.")
flags.DEFINE_integer("n", 3, "Number of examples to show.")
flags.DEFINE_integer("inputs_length", 512, "Token length of inputs (truncation; span corruption).")
flags.DEFINE_integer("targets_length", 128, "Token length of targets.")
flags.DEFINE_enum("vocabulary", "task", ["task", "embedded", "bytes"],
                  "'task': the task's own vocabulary; 'embedded' or 'bytes': the same definition "
                  "re-registered with a local vocabulary.")
flags.DEFINE_bool("mock_data", False, "Read TFDS sources from tfds.testing.mock_data.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory (like --t5_tfds_data_dir).")
flags.DEFINE_integer("seed", 0, "Seed of the task's random preprocessing.")
flags.DEFINE_multi_string("module_import", None, "Module to import before looking up --task, "
                          "e.g. the module registering your own task (repeatable).")

_LOCAL_SUFFIX = "_inspect_local"


def _local_vocabulary(kind):
  if kind == "embedded":
    return st_moe.tasks.embedded_vocabulary()
  return seqio.ByteVocabulary(extra_ids=100)


def resolve_task(name, vocabulary_kind):
  """Returns the seqio.Task to show, re-registering it with a local vocabulary if asked."""
  if name not in seqio.TaskRegistry.names():
    known = ", ".join(sorted(n for n in seqio.TaskRegistry.names() if n.startswith("st_moe_")))
    raise ValueError(f"--task={name!r} is not a registered task (your own task: add "
                     f"--module_import=<the module registering it>); st-moe's tasks: {known}")
  if vocabulary_kind == "task":
    return seqio.get_mixture_or_task(name)
  benchmark = {families.task_name(b.name): b for b in families.all_benchmarks()}.get(name)
  if benchmark is None:
    raise ValueError(f"--vocabulary={vocabulary_kind} needs one of st-moe's own tasks, not "
                     f"{name!r}; use --vocabulary=task.")
  local = name + _LOCAL_SUFFIX
  if local not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(local, **families.task_kwargs(benchmark,
                                                         _local_vocabulary(vocabulary_kind)))
  return seqio.get_mixture_or_task(local)


def format_examples(task, split, n, sequence_length, seed=0):
  """Returns the first n processed examples of `task` as printable text blocks."""
  ds = task.get_dataset(sequence_length, split=split, shuffle=False, seed=seed,
                        try_in_mem_cache=False)
  blocks = []
  for i, ex in enumerate(ds.take(n).as_numpy_iterator()):
    lines = [f"--- example {i} ({task.name}, split {split})"]
    for key in ("inputs", "targets"):
      if f"{key}_pretokenized" in ex:
        lines.append(f"{key}_pretokenized: {ex[key + '_pretokenized'].decode('utf-8')}")
      if key in ex:
        ids = ex[key].tolist()
        text = task.output_features[key].vocabulary.decode(ids)
        lines.append(f"{key} ({len(ids)} ids): {ids}")
        lines.append(f"{key} decoded: {text}")
    blocks.append("\n".join(lines))
  return blocks


def main(argv):
  del argv
  if not FLAGS.task:
    raise app.UsageError("--task is required, e.g. --task=st_moe_embedded_span_corruption")
  for module in FLAGS.module_import or []:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise app.UsageError(f"--module_import={module}: cannot import it ({e}); put it on "
                           "PYTHONPATH or install it") from e
  if FLAGS.tfds_data_dir:
    seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)
  task = resolve_task(FLAGS.task, FLAGS.vocabulary)
  if FLAGS.split not in task.splits:
    raise ValueError(f"--split={FLAGS.split!r} is not a split of {FLAGS.task}: {list(task.splits)}")
  with contextlib.ExitStack() as stack:
    if FLAGS.mock_data:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      stack.enter_context(tfds.testing.mock_data(num_examples=max(FLAGS.n, 1),
                                                 policy=tfds.testing.MockPolicy.USE_CODE))
    try:
      blocks = format_examples(task, FLAGS.split, FLAGS.n,
                               {"inputs": FLAGS.inputs_length, "targets": FLAGS.targets_length},
                               seed=FLAGS.seed)
    except st_moe.tasks.DatasetNotPreparedError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  print("\n".join(blocks))
  return 0


if __name__ == "__main__":
  app.run(main)
