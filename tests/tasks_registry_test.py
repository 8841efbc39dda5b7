"""st-moe's task registry: names, mixtures, vocabularies, the embedded task, missing-data errors.

Also runs the embedded pretraining task through t5's `mesh_train_dataset_fn` (the path
`t5_mesh_transformer` uses) and `tools/inspect_task.py` as a command.
"""
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import seqio
import t5.data
from t5.models import mesh_transformer
from t5.models import utils as t5_model_utils

import st_moe.tasks
from st_moe.tasks import families
from st_moe.tasks import vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWNSTREAM = [
    "super_glue_boolq", "super_glue_cb", "super_glue_copa", "super_glue_multirc",
    "super_glue_record", "super_glue_rte", "super_glue_wic", "super_glue_wsc", "arc_easy",
    "arc_challenge", "winogrande", "anli_r3", "xsum", "cnn_dailymail", "web_questions",
    "natural_questions_open", "trivia_qa"]
PRETRAINING = ["c4_span_corruption", "embedded_span_corruption",
               "embedded_docs_span_corruption"]  # the last: tests/corpus_test.py
EMBEDDED_DOWNSTREAM = ["embedded_pydoc_topic",  # tests/downstream_task_test.py
                       "embedded_docs_pydoc_topic"]


class RegistryTest(absltest.TestCase):

  def test_every_task_and_mixture_is_registered(self):
    for name in DOWNSTREAM + PRETRAINING:
      self.assertIn("st_moe_" + name, seqio.TaskRegistry.names())
    self.assertCountEqual(st_moe.tasks.TASKS, ["st_moe_" + n for n in
                                               PRETRAINING + DOWNSTREAM + EMBEDDED_DOWNSTREAM])
    for name in ("st_moe_pretrain", "st_moe_super_glue", "st_moe_finetune"):
      self.assertIn(name, seqio.MixtureRegistry.names())

  def test_importing_again_is_safe_and_changes_nothing(self):
    before = {n: seqio.get_mixture_or_task(n) for n in st_moe.tasks.TASKS}
    importlib.reload(st_moe.tasks)
    for name, task in before.items():
      self.assertIs(seqio.get_mixture_or_task(name), task)

  def test_super_glue_mixture_rates_by_training_examples(self):
    mix = seqio.get_mixture_or_task("st_moe_super_glue")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    # TFDS super_glue 1.0.2 train sizes; WSC is wsc.fixed's full train split.
    self.assertEqual(rates, {
        "st_moe_super_glue_boolq": 9427, "st_moe_super_glue_cb": 250,
        "st_moe_super_glue_copa": 400, "st_moe_super_glue_multirc": 27243,
        "st_moe_super_glue_record": 138854, "st_moe_super_glue_rte": 2490,
        "st_moe_super_glue_wic": 5428, "st_moe_super_glue_wsc": 554})

  def test_finetune_mixture_holds_every_downstream_task_once(self):
    mix = seqio.get_mixture_or_task("st_moe_finetune")
    self.assertCountEqual([t.name for t in mix.tasks], ["st_moe_" + n for n in DOWNSTREAM])
    self.assertTrue(all(mix.get_rate(t) > 0 for t in mix.tasks))
    pretrain = seqio.get_mixture_or_task("st_moe_pretrain")
    self.assertEqual([t.name for t in pretrain.tasks], ["st_moe_c4_span_corruption"])

  def test_registered_tasks_default_to_t5_vocabulary(self):
    t5_vocab = t5.data.get_default_vocabulary()
    for name in ["st_moe_" + n for n in DOWNSTREAM + ["c4_span_corruption"]]:
      task = seqio.get_mixture_or_task(name)
      for key in ("inputs", "targets"):
        v = task.output_features[key].vocabulary
        self.assertEqual(v.sentencepiece_model_file, t5_vocab.sentencepiece_model_file)
        self.assertEqual(v.extra_ids, 100)
        self.assertTrue(task.output_features[key].add_eos)
    # T5's default: the cc_all.32000 model plus 100 extra ids (= cc_all.32000.100extra).
    self.assertEqual(t5_vocab.sentencepiece_model_file,
                     "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model")
    self.assertEqual(t5_vocab.extra_ids, 100)

  def test_c4_task_source_and_span_corruption_settings(self):
    task = seqio.get_mixture_or_task("st_moe_c4_span_corruption")
    self.assertEqual(task.source.tfds_dataset.name, "c4/en:3.1.0")
    span = [p for p in task.preprocessors if getattr(p, "func", None) is
            t5.data.preprocessors.span_corruption]
    self.assertLen(span, 1)
    self.assertEqual(span[0].keywords, {"mean_noise_span_length": 3.0, "noise_density": 0.15})

  def test_another_vocabulary_registers_a_parallel_family(self):
    byte_vocab = seqio.ByteVocabulary(extra_ids=100)
    names = families.add_tasks(byte_vocab, suffix="_registry_test")
    mixes = families.add_mixtures("_registry_test")
    try:
      self.assertLen(names, len(DOWNSTREAM + PRETRAINING + EMBEDDED_DOWNSTREAM))
      for name in names:
        task = seqio.get_mixture_or_task(name)
        self.assertIs(task.output_features["targets"].vocabulary, byte_vocab)
      mix = seqio.get_mixture_or_task("st_moe_super_glue_registry_test")
      self.assertTrue(all(t.name.endswith("_registry_test") for t in mix.tasks))
    finally:
      families.remove(names + mixes)
    self.assertNotIn(names[0], seqio.TaskRegistry.names())


class MissingDataTest(absltest.TestCase):
  """Uses a copy of the family: a TFDS source remembers the data-dir override it first saw."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.names = families.add_tasks(seqio.ByteVocabulary(extra_ids=100), suffix="_missing_test")

  @classmethod
  def tearDownClass(cls):
    families.remove(cls.names)
    super().tearDownClass()

  def tearDown(self):
    seqio.set_tfds_data_dir_override(None)
    super().tearDown()

  def _error(self, task_name, split):
    empty = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, empty, ignore_errors=True)
    seqio.set_tfds_data_dir_override(empty)
    task = seqio.get_mixture_or_task(task_name + "_missing_test")
    with self.assertRaises(st_moe.tasks.DatasetNotPreparedError) as raised:
      task.get_dataset({"inputs": 32, "targets": 32}, split=split, shuffle=False)
    return str(raised.exception), empty

  def test_missing_tfds_data_names_builder_version_and_fix(self):
    message, empty = self._error("st_moe_xsum", "validation")
    for part in ("'xsum:1.1.0'", "split 'validation'", empty, "tfds build xsum:1.1.0 --data_dir=",
                 "--t5_tfds_data_dir"):
      self.assertIn(part, message)

  def test_missing_c4_mentions_beam(self):
    message, _ = self._error("st_moe_c4_span_corruption", "train")
    self.assertIn("'c4/en:3.1.0'", message)
    self.assertIn("Beam", message)

  def test_winogrande_split_mapping_survives_into_the_message(self):
    message, _ = self._error("st_moe_winogrande", "train")
    self.assertIn("'winogrande:1.2.0'", message)

  def test_unpinned_tfds_name_is_refused(self):
    with self.assertRaisesRegex(ValueError, "pin the version"):
      st_moe.tasks.sources.PreparedTfdsDataSource("xsum")


class EmbeddedTaskTest(absltest.TestCase):

  def test_vocabulary_layout(self):
    v = st_moe.tasks.embedded_vocabulary()
    self.assertIs(v, st_moe.tasks.embedded_vocabulary())
    self.assertEqual((v.pad_id, v.eos_id, v.unk_id), (0, 1, 2))
    self.assertEqual(v.vocab_size, 2100)
    self.assertEqual(v.extra_ids, 100)
    self.assertEqual(v.decode([v.vocab_size - 1]), "<extra_id_0>")
    text = "The import statement binds names in the local namespace."
    self.assertEqual(v.decode(v.encode(text)), text)
    # Pieces are words and subwords, not bytes: far fewer ids than characters.
    self.assertLess(len(v.encode(text)), len(text) / 3)

  def test_shipped_model_regenerates_identically(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = vocab.build_embedded_model(os.path.join(tmp, "m.model"))
      with open(path, "rb") as f:
        rebuilt = hashlib.sha256(f.read()).hexdigest()
    with open(vocab.EMBEDDED_MODEL_PATH, "rb") as f:
      shipped = hashlib.sha256(f.read()).hexdigest()
    self.assertEqual(rebuilt, shipped)
    self.assertLess(os.path.getsize(vocab.EMBEDDED_MODEL_PATH), 400_000)

  def test_splits_are_disjoint_and_cover_pydoc_topics(self):
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
    train, valid = vocab.embedded_texts("train"), vocab.embedded_texts("validation")
    self.assertEqual((len(train), len(valid)), (70, 8))
    self.assertEmpty(set(train) & set(valid))
    self.assertCountEqual(train + valid, set(topics.topics.values()))
    with self.assertRaisesRegex(ValueError, "split='test'"):
      vocab.embedded_texts("test")

  def test_span_corruption_examples(self):
    task = seqio.get_mixture_or_task(st_moe.tasks.EMBEDDED_TASK)
    v = task.output_features["targets"].vocabulary
    self.assertIs(v, st_moe.tasks.embedded_vocabulary())
    self.assertCountEqual(task.splits, ["train", "validation"])
    lengths = {"inputs": 128, "targets": 32}
    ds = task.get_dataset(lengths, split="validation", shuffle=False, seed=1)
    examples = list(ds.take(20).as_numpy_iterator())
    self.assertLen(examples, 20)
    noise, total = 0, 0
    for ex in examples:
      inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
      self.assertEqual(inputs[-1], v.eos_id)
      self.assertEqual(targets[-1], v.eos_id)
      self.assertLessEqual(len(inputs), 128)
      self.assertLessEqual(len(targets), 32)
      sentinels = lambda ids: [i for i in ids if i >= v.vocab_size - 100]
      # Sentinels count down from the top id, alternating between inputs and targets.
      self.assertEqual(sentinels(inputs), list(range(v.vocab_size - 1, v.vocab_size - 1 -
                                                      len(sentinels(inputs)), -1)))
      self.assertEqual(sentinels(targets)[:len(sentinels(inputs))], sentinels(inputs))
      noise += len(targets) - 1 - len(sentinels(targets))
      total += len(targets) - 1 - len(sentinels(targets)) + len(inputs) - 1 - len(
          sentinels(inputs))
    self.assertAlmostEqual(noise / total, 0.15, delta=0.02)

  def test_through_t5_mesh_train_dataset_fn(self):
    ds = mesh_transformer.mesh_train_dataset_fn(
        st_moe.tasks.EMBEDDED_TASK, {"inputs": 64, "targets": 16}, seed=0)
    ex = next(ds.as_numpy_iterator())
    for key in ("inputs", "targets"):
      self.assertEqual(ex[key].shape, (64,) if key == "inputs" else (16,))
      self.assertIn(key + "_segmentation", ex)
      self.assertIn(key + "_position", ex)
    self.assertGreater(np.count_nonzero(ex["inputs"]), 32)  # packed
    # t5_mesh_transformer takes the run's vocabulary from the task's output features.
    vocabularies = t5_model_utils.get_vocabulary(st_moe.tasks.EMBEDDED_TASK)
    self.assertEqual(vocabularies, (st_moe.tasks.embedded_vocabulary(),) * 2)


class InspectTaskToolTest(absltest.TestCase):

  def test_shows_embedded_examples_as_text(self):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "inspect_task.py"),
         "--task=st_moe_embedded_span_corruption", "--split=validation", "--n=2",
         "--inputs_length=64", "--targets_length=16"],
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stdout.count("--- example"), 2)
    self.assertIn("inputs decoded:", proc.stdout)
    self.assertIn("<extra_id_0>", proc.stdout)

  def test_missing_data_is_a_message_not_a_traceback(self):
    with tempfile.TemporaryDirectory() as empty:
      proc = subprocess.run(
          [sys.executable, os.path.join(REPO, "tools", "inspect_task.py"),
           "--task=st_moe_arc_easy", "--vocabulary=embedded", f"--tfds_data_dir={empty}"],
          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 1)
    self.assertIn("error: TFDS data set 'ai2_arc/ARC-Easy:1.0.0'", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
