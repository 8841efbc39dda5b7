"""The embedded downstream task `st_moe_embedded_pydoc_topic`: golden example, metric, splits.

The golden example is written by hand and goes through the registered task's real preprocessing
(seqio.test_utils injects it). The metric is seqio's Evaluator on the real validation split: the
gold targets as predictions score 100; the constant answer "compound" scores the majority rate,
25.0 (18 of the 72 validation passages, hand count: 90 passages per topic, every 5th held out).
"""
from unittest import mock

from absl.testing import absltest
from pydoc_data import topics
import seqio
from seqio import test_utils

import st_moe.tasks
from st_moe.tasks import pydoc_topic

TASK = "st_moe_embedded_pydoc_topic"
LENGTHS = {"inputs": 128, "targets": 8}  # the lengths recommended for fine-tuning
DOCS_LENGTHS = {"inputs": 192, "targets": 8}  # the same, in the docs vocabulary


class _Predict(seqio.evaluation.PredictFnCallable):
  """A "model" answering answers[i] for the i-th example (ids, EOS, padding, like a decoder)."""

  def __init__(self, vocabulary, answers):
    self._ids = [vocabulary.encode(a) + [vocabulary.eos_id] for a in answers]

  def __call__(self, dataset=None, model_feature_lengths=None):
    length = max(len(x) for x in self._ids)
    return [(i, x + [0] * (length - len(x))) for i, x in enumerate(self._ids)]


def _validation_metrics(answers_fn):
  task = seqio.get_mixture_or_task(TASK)
  targets = [ex["targets_pretokenized"].decode("utf-8") for ex in
             task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator()]
  evaluator = seqio.evaluation.Evaluator(
      TASK, feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split="validation", async_compute_metrics=False, use_memory_cache=False)
  vocabulary = task.output_features["targets"].vocabulary
  results = evaluator.evaluate(compute_metrics=True,
                               predict_fn=_Predict(vocabulary, answers_fn(targets)))
  return results[0].result()[TASK]


class PydocTopicTaskTest(absltest.TestCase):

  def test_registered_with_the_embedded_vocabulary(self):
    self.assertEqual(st_moe.tasks.EMBEDDED_DOWNSTREAM_TASK, TASK)
    self.assertIn(TASK, st_moe.tasks.TASKS)
    task = seqio.get_mixture_or_task(TASK)
    for key in ("inputs", "targets"):
      self.assertIs(task.output_features[key].vocabulary, st_moe.tasks.embedded_vocabulary())
      self.assertTrue(task.output_features[key].add_eos)
    self.assertCountEqual(task.splits, ["train", "validation"])

  def test_golden_example(self):
    passage = "Use the pdb module to step through a program one line at a time."
    out = test_utils.test_preprocessing_single(
        TASK, {"validation": {"passage": passage, "topic": "debugger"}},
        sequence_length=LENGTHS)
    self.assertEqual(out["inputs_pretokenized"].decode("utf-8"),
                     "pydoc topic passage: Use the pdb module to step through a program one "
                     "line at a time.")
    self.assertEqual(out["targets_pretokenized"].decode("utf-8"), "debugger")
    v = st_moe.tasks.embedded_vocabulary()
    self.assertEqual(out["targets"].tolist(), v.encode("debugger") + [v.eos_id])
    self.assertEqual(v.decode(out["inputs"].tolist()[:-1]),
                     "pydoc topic passage: Use the pdb module to step through a program one "
                     "line at a time.")

  def test_split_sizes_and_balance(self):
    train, valid = pydoc_topic.examples("train"), pydoc_topic.examples("validation")
    self.assertEqual((len(train), len(valid)), (288, 72))  # 4 x 72, 4 x 18
    for name in ("compound", "debugger", "formatstrings", "specialnames"):
      self.assertLen([e for e in train if e["topic"] == name], 72)
      self.assertLen([e for e in valid if e["topic"] == name], 18)
    self.assertEmpty({e["passage"] for e in train} & {e["passage"] for e in valid})
    task = seqio.get_mixture_or_task(TASK)
    self.assertEqual(task.num_input_examples("train"), 288)
    self.assertEqual(task.num_input_examples("validation"), 72)
    with self.assertRaisesRegex(ValueError, "split='test'"):
      pydoc_topic.examples("test")

  def test_passages_are_32_words_of_the_topic_text_without_underlines(self):
    vocabulary = {name: set(topics.topics[name].split()) for name in topics.topics}
    for e in pydoc_topic.examples("train") + pydoc_topic.examples("validation"):
      words = e["passage"].split()
      self.assertLen(words, 32)
      self.assertNotIn("*****", e["passage"])
      self.assertNotIn("=====", e["passage"])
      outside = set(words) - vocabulary[e["topic"]]
      self.assertEmpty(outside, f"words not in pydoc topic {e['topic']!r}")
    # The first validation passage is the 5th passage of "compound" (words 128..159).
    first = pydoc_topic.examples("validation")[0]
    self.assertEqual(first["topic"], "compound")
    self.assertTrue(first["passage"].startswith(
        "begins with a uniquely identifying keyword and ends with a colon."), first["passage"])

  def test_splits_are_deterministic(self):
    task = seqio.get_mixture_or_task(TASK)
    for split in ("train", "validation"):
      runs = [[(ex["inputs_pretokenized"], ex["targets_pretokenized"]) for ex in
               task.get_dataset(LENGTHS, split=split, shuffle=False).as_numpy_iterator()]
              for _ in range(2)]
      self.assertEqual(runs[0], runs[1])
      self.assertLen(runs[0], 288 if split == "train" else 72)

  def test_recommended_lengths_never_truncate(self):
    task = seqio.get_mixture_or_task(TASK)
    v = st_moe.tasks.embedded_vocabulary()
    for split in ("train", "validation"):
      for ex in task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator():
        self.assertLessEqual(len(ex["inputs"]), LENGTHS["inputs"])
        self.assertLessEqual(len(ex["targets"]), LENGTHS["targets"])
        target = ex["targets_pretokenized"].decode("utf-8")
        self.assertEqual(v.decode(ex["targets"].tolist()), target)  # decodable

  def test_accuracy_is_100_on_gold_and_25_for_a_constant(self):
    gold = _validation_metrics(lambda targets: targets)
    self.assertEqual(gold, {"accuracy": 100.0})
    constant = _validation_metrics(lambda targets: ["compound"] * len(targets))
    self.assertAlmostEqual(constant["accuracy"], 25.0, places=6)
    self.assertEqual(pydoc_topic.MAJORITY_ACCURACY, 25.0)

  def test_docs_vocabulary_twin_has_the_same_examples_in_the_docs_vocabulary(self):
    from st_moe.tasks import corpus  # pylint: disable=g-import-not-at-top
    twin = seqio.get_mixture_or_task("st_moe_" + pydoc_topic.DOCS_NAME)
    docs = corpus.docs_vocabulary()
    for key in ("inputs", "targets"):
      self.assertIs(twin.output_features[key].vocabulary, docs)
    for split in ("train", "validation"):
      ours = list(seqio.get_mixture_or_task(TASK).get_dataset(
          None, split=split, shuffle=False).as_numpy_iterator())
      theirs = list(twin.get_dataset(None, split=split, shuffle=False).as_numpy_iterator())
      self.assertLen(theirs, len(ours))
      for a, b in zip(ours, theirs):
        self.assertEqual(a["inputs_pretokenized"], b["inputs_pretokenized"])
        self.assertEqual(a["targets_pretokenized"], b["targets_pretokenized"])
        # Tokenized by the docs vocabulary (decodes back), and within --scale=small's fine-tuning
        # lengths (the docs vocabulary cuts pydoc's prose finer: up to 163 input tokens).
        self.assertEqual(docs.decode(b["targets"].tolist()), b["targets_pretokenized"].decode())
        self.assertLessEqual(len(b["inputs"]), DOCS_LENGTHS["inputs"])
        self.assertLessEqual(len(b["targets"]), DOCS_LENGTHS["targets"])

  def test_too_short_topic_names_the_setting(self):
    with mock.patch.object(pydoc_topic, "PASSAGES_PER_TOPIC", 10_000):
      with self.assertRaisesRegex(ValueError, r"'compound' has \d+ words, fewer than "
                                  r"PASSAGES_PER_TOPIC=10000 x PASSAGE_WORDS=32"):
        pydoc_topic.examples("train")


if __name__ == "__main__":
  absltest.main()
