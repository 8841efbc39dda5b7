"""Every st-moe TFDS task runs its real pipeline (TFDS source included) on TFDS mock data.

`tfds.testing.mock_data` makes the TFDS builders of the pinned versions yield random examples of
their real features, so the source (with its pinned version and split mapping), t5's and our text
preprocessors, tokenization with a local vocabulary, span corruption and EOS all run as in a real
job. Checked: the features, dtypes, lengths and the final EOS of every example.
"""
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import seqio
import tensorflow_datasets as tfds

import st_moe.tasks
from st_moe.tasks import families

SUFFIX = "_pipeline_test"
NUM_MOCK = 3
LENGTHS = {"inputs": 64, "targets": 16}
# The split each task is read from; web_questions has no validation split, and WinoGrande's train
# split maps to TFDS's train_xl.
SPLIT = {"web_questions": "test", "winogrande": "train", "c4_span_corruption": "train"}


def _read(name, split):
  task = seqio.get_mixture_or_task(name)
  with tfds.testing.mock_data(num_examples=NUM_MOCK, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, try_in_mem_cache=False)
    return task, list(ds.as_numpy_iterator())


class TasksPipelineTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.vocab = st_moe.tasks.embedded_vocabulary()
    cls.names = families.add_tasks(cls.vocab, suffix=SUFFIX)

  @classmethod
  def tearDownClass(cls):
    families.remove(cls.names)
    super().tearDownClass()

  @parameterized.named_parameters((b.name, b.name) for b in families.benchmarks())
  def test_downstream_task_on_mock_tfds(self, benchmark):
    split = SPLIT.get(benchmark, "validation")
    task, examples = _read(families.task_name(benchmark, SUFFIX), split)
    # ReCoRD makes one example per answer (none: one "<unk>" example); all others one per input.
    if benchmark == "super_glue_record":
      self.assertGreaterEqual(len(examples), NUM_MOCK)
    else:
      self.assertLen(examples, NUM_MOCK)
    eos = self.vocab.eos_id
    for ex in examples:
      for key in ("inputs", "targets"):
        ids = ex[key]
        self.assertEqual(ids.dtype, np.int32, key)
        self.assertEqual(ids.ndim, 1, key)
        # Inputs have at least the task prefix; a target may be empty (an unlabelled mock).
        self.assertBetween(len(ids), 2 if key == "inputs" else 1, LENGTHS[key], key)
        self.assertEqual(ids[-1], eos, f"{benchmark} {key} does not end in EOS: {ids}")
        self.assertNotIn(eos, ids[:-1].tolist(), key)
        self.assertTrue(np.all(ids[:-1] < self.vocab.vocab_size - 100), key)  # no sentinels
        text = ex[f"{key}_pretokenized"].decode("utf-8")
        # The ids are the (truncated) tokenization of the text, EOS after trimming.
        self.assertEqual(ids[:-1].tolist(), self.vocab.encode(text)[:LENGTHS[key] - 1], key)
      prefix = {"xsum": "summarize:", "cnn_dailymail": "summarize:"}.get(benchmark)
      if prefix:
        self.assertStartsWith(ex["inputs_pretokenized"].decode("utf-8"), prefix)
    self.assertEqual(set(task.output_features), {"inputs", "targets"})

  def test_c4_span_corruption_on_mock_tfds(self):
    task, examples = _read(families.task_name("c4_span_corruption", SUFFIX), "train")
    self.assertNotEmpty(examples)
    sentinel_0 = self.vocab.vocab_size - 1
    for ex in examples:
      self.assertEqual(set(ex), {"inputs", "targets"})
      for key in ("inputs", "targets"):
        self.assertLessEqual(len(ex[key]), LENGTHS[key])
        self.assertEqual(ex[key][-1], self.vocab.eos_id)
      # Span corruption: both sides start their first noise/non-noise span with sentinels.
      self.assertIn(sentinel_0, ex["inputs"].tolist() + ex["targets"].tolist())
    self.assertEqual(task.source.tfds_dataset.name, "c4/en:3.1.0")


if __name__ == "__main__":
  absltest.main()
