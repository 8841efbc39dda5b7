"""A SeqIO task over text that ships with Python, byte vocabulary, for end-to-end runs in tests.

Imported by `t5_mesh_transformer --module_import=testing_tasks` (with tests/ on PYTHONPATH) so that
tests exercise the real training entry point without the project's own task definitions.
"""
import functools

from pydoc_data import topics
import seqio
from t5.data import preprocessors
import tensorflow as tf

TASK_NAME = "st_moe_test_bytes_span_corruption"
VOCABULARY = seqio.ByteVocabulary(extra_ids=100)


def _dataset_fn(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  texts = [t for _, t in sorted(topics.topics.items())]
  texts = texts[:-8] if split == "train" else texts[-8:]
  return tf.data.Dataset.from_tensor_slices({"text": texts})


if TASK_NAME not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      TASK_NAME,
      source=seqio.FunctionDataSource(_dataset_fn, splits=["train", "validation"]),
      preprocessors=[
          functools.partial(preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
          seqio.preprocessors.tokenize,
          preprocessors.span_corruption,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features={"inputs": seqio.Feature(VOCABULARY, add_eos=True),
                       "targets": seqio.Feature(VOCABULARY, add_eos=True)},
      metric_fns=[])
