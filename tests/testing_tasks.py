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

# A decodable task with a text metric, for fine-tuning and evaluation-by-decoding tests: the input
# is a word of Python's pydoc text, the target the same word reversed; exact-match accuracy.
REVERSE_TASK_NAME = "st_moe_test_reverse_word"
REVERSE_VALIDATION_SIZE = 16


def _words():
  """Distinct lower-case alphabetic words of 3 to 8 letters, in first-seen order."""
  seen = {}
  for _, text in sorted(topics.topics.items()):
    for word in text.split():
      if word.isalpha() and word.isascii() and 3 <= len(word) <= 8:
        seen.setdefault(word.lower(), None)
  return list(seen)


def _reverse_dataset_fn(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  words = _words()
  words = (words[:-REVERSE_VALIDATION_SIZE] if split == "train"
           else words[-REVERSE_VALIDATION_SIZE:])
  return tf.data.Dataset.from_tensor_slices({"inputs": words,
                                             "targets": [w[::-1] for w in words]})


if REVERSE_TASK_NAME not in seqio.TaskRegistry.names():
  from t5.evaluation import metrics  # pylint: disable=g-import-not-at-top
  seqio.TaskRegistry.add(
      REVERSE_TASK_NAME,
      source=seqio.FunctionDataSource(_reverse_dataset_fn, splits=["train", "validation"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(VOCABULARY, add_eos=True),
                       "targets": seqio.Feature(VOCABULARY, add_eos=True)},
      metric_fns=[metrics.accuracy])
