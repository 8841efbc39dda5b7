"""The docs corpus, its vocabulary and `st_moe_embedded_docs_span_corruption`.

Expected values come from outside the code under test: the SHA-256 and sizes written here were
recorded when the corpus was built (docs/corpus.md); the pydoc size is measured from
`pydoc_data.topics` itself; the split rule and the 8-gram overlap are recomputed here with hashlib
and re; span corruption is checked by putting the targets' spans back into the inputs and comparing
with the document's own tokens.

The full regeneration from the installed packages takes minutes; it runs when
ST_MOE_FULL_CORPUS_TEST=1 (the first three packages are regenerated in every run).
"""
import hashlib
import lzma
import os
import re
import tempfile

from absl.testing import absltest
import seqio
from t5.models import mesh_transformer
from t5.models import utils as t5_model_utils

import st_moe.tasks
from st_moe.tasks import corpus
from st_moe.tasks import corpus_extract

CORPUS_SHA256 = "9936fc3e218e23f4cc2a706f9f02bfe48d03050b334d959a458ebb3bc547a3a4"
MODEL_SHA256 = "2b527f06ee6cbdfe32d337346eb829c2d5e0f1759c4cf4c6fefd8a2f14296b31"
DOCUMENTS, TEXT_BYTES = 4965, 12_410_745
TRAIN_DOCUMENTS, VALIDATION_DOCUMENTS = 4710, 255
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _grams(paragraph):
  words = [w.lower() for w in _WORD.findall(paragraph)]
  return {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}


class CorpusTest(absltest.TestCase):

  def test_shipped_text_has_the_recorded_sha256(self):
    with open(corpus.CORPUS_PATH, "rb") as f:
      compressed = f.read()
    self.assertEqual(_sha256(lzma.decompress(compressed)), CORPUS_SHA256)
    self.assertEqual(corpus.CORPUS_SHA256, CORPUS_SHA256)
    # A source checkout grows by the compressed file only.
    self.assertLess(len(compressed), 5_000_000)

  def test_size_is_over_20_times_pydoc_and_10_mb(self):
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
    pydoc_bytes = sum(len(t.encode("utf-8")) for t in set(topics.topics.values()))
    docs = corpus.documents()
    text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    self.assertEqual((len(docs), text_bytes), (DOCUMENTS, TEXT_BYTES))
    self.assertGreaterEqual(text_bytes, 20 * pydoc_bytes)
    self.assertGreaterEqual(text_bytes, 10_000_000)
    ids = [d["id"] for d in docs]
    self.assertEqual(ids, sorted(set(ids)))
    # Every document names a file of a listed package and records that file's hash.
    folders = {p[2] for p in corpus_extract.PACKAGES}
    for d in docs:
      self.assertIn(d["id"].split("/")[0], folders)
      self.assertRegex(d["source_sha256"], r"^[0-9a-f]{64}$")

  def test_split_by_document_hash_and_disjoint(self):
    train, valid = corpus.split_documents("train"), corpus.split_documents("validation")
    self.assertEqual((len(train), len(valid)), (TRAIN_DOCUMENTS, VALIDATION_DOCUMENTS))
    train_ids, valid_ids = {d["id"] for d in train}, {d["id"] for d in valid}
    self.assertEmpty(train_ids & valid_ids)
    self.assertEqual(train_ids | valid_ids, {d["id"] for d in corpus.documents()})
    for doc_id in list(valid_ids)[:50]:
      digest = hashlib.sha256(doc_id.encode()).digest()
      self.assertEqual(int.from_bytes(digest[:8], "big") % 20, 0, doc_id)
    # The split lists mix packages (hash order), not one package after another.
    first = {d["id"].split("/")[0] for d in valid[:40]}
    self.assertGreater(len(first), 5)
    with self.assertRaisesRegex(ValueError, "split='test'"):
      corpus.split_documents("test")

  def test_validation_repeats_no_train_paragraph(self):
    train_paragraphs = {p for t in corpus.split_texts("train") for p in t.split("\n")}
    valid_paragraphs = [p for t in corpus.split_texts("validation") for p in t.split("\n")]
    self.assertEmpty([p for p in valid_paragraphs if p in train_paragraphs])
    train_grams = set().union(*(_grams(p) for p in train_paragraphs))
    valid_grams = set().union(*(_grams(p) for p in valid_paragraphs))
    # Measured 1.2% when built: phrases like "if not specified, the default is" recur.
    self.assertLess(len(valid_grams & train_grams) / len(valid_grams), 0.03)

  def test_prose_not_code(self):
    texts = corpus.split_texts("validation")
    paragraphs = [p for t in texts for p in t.split("\n")]
    self.assertEmpty([p for p in paragraphs if p.startswith((">>>", "..", "http"))])
    self.assertEmpty([p for p in paragraphs if "Licensed under the Apache" in p])
    words = " ".join(paragraphs).split()
    the = sum(w.lower() == "the" for w in words)
    self.assertGreater(the / len(words), 0.04)  # English prose: ~5-7% of words are "the"

  def test_first_packages_regenerate_the_shipped_prefix(self):
    # A package's documents depend only on the packages before it (duplicates resolve forward).
    packages = corpus_extract.PACKAGES[:3]
    self.assertEqual([p[2] for p in packages], ["mesh_tensorflow", "t5", "seqio"])
    rebuilt = corpus_extract.extract_documents(packages)
    shipped = [d for d in corpus.documents()
               if d["id"].split("/")[0] in ("mesh_tensorflow", "t5", "seqio")]
    self.assertLen(rebuilt, len(shipped))
    self.assertEqual(rebuilt, shipped)
    for d in rebuilt[:5]:
      with open(_installed(d["id"]), "rb") as f:
        self.assertEqual(_sha256(f.read()), d["source_sha256"])

  @absltest.skipUnless(os.environ.get("ST_MOE_FULL_CORPUS_TEST") == "1",
                       "takes minutes; set ST_MOE_FULL_CORPUS_TEST=1")
  def test_whole_corpus_regenerates(self):
    with tempfile.TemporaryDirectory() as tmp:
      digest = corpus.build_corpus(os.path.join(tmp, "c.jsonl.xz"))
    self.assertEqual(digest, CORPUS_SHA256)

  def test_other_package_version_is_refused(self):
    wrong = [("t5", "0.0.1", "t5")]
    with self.assertRaisesRegex(corpus_extract.PackageVersionError,
                                r"t5==0\.9\.4 is installed.*t5==0\.0\.1"):
      corpus_extract.extract_documents(wrong)


def _installed(doc_id: str) -> str:
  """The installed file of a document id ("t5/data/utils.py")."""
  folder = doc_id.split("/")[0]
  return dict(corpus_extract.source_files(folder))[doc_id]


class ExtractionRulesTest(absltest.TestCase):

  def test_paragraphs_drop_markup_and_keep_descriptions(self):
    doc = ("Computes the mean of the values along an axis.\n\n"
           "Args:\n"
           "  x (Tensor): the values whose mean is computed here.\n\n"
           "Parameters\n----------\naxis : int\n    The axis along which the mean is taken.\n\n"
           "Example::\n\n    y = mean(x)\n\n"
           ">>> mean([1, 2])\n1.5 is the mean of the numbers one and two, as printed\n\n"
           "```python\nprint('The mean is computed over all of the values given here')\n```\n"
           "https://example.com/mean\n")
    self.assertEqual(corpus_extract.paragraphs(doc), [
        "Computes the mean of the values along an axis.",
        "the values whose mean is computed here.",
        "The axis along which the mean is taken.",
        "Example:"])

  def test_is_prose(self):
    self.assertTrue(corpus_extract.is_prose(
        "The axis along which the mean is taken, or all of them when it is not given."))
    self.assertFalse(corpus_extract.is_prose("x = tf.reduce_mean(x, axis=[0, 1]) + y[:, None]"))
    self.assertFalse(corpus_extract.is_prose("The mean of x."))  # under 8 words

  def test_comments_join_lines_and_drop_boilerplate(self):
    source = ("# Copyright 2020 Someone.\n# Licensed under the Apache License.\nimport os\n"
              "def f():\n  # First we compute the mean\n  # of all the values.\n  return 1\n")
    self.assertEqual(corpus_extract.comments(source),
                     [(5, "First we compute the mean\nof all the values.")])


class VocabularyTest(absltest.TestCase):

  def test_layout(self):
    v = corpus.docs_vocabulary()
    self.assertIs(v, corpus.docs_vocabulary())
    self.assertEqual((v.pad_id, v.eos_id, v.unk_id), (0, 1, 2))
    self.assertEqual(v.vocab_size, 8192)
    self.assertEqual(v.extra_ids, 100)
    self.assertEqual(v.decode([8191]), "<extra_id_0>")
    self.assertEqual(v.decode([8092]), "<extra_id_99>")
    text = "Returns the indices of the maximum values along an axis."
    self.assertEqual(v.decode(v.encode(text)), text)
    self.assertLess(len(v.encode(text)), len(text) / 4)

  def test_shipped_model_regenerates_byte_identically(self):
    with open(corpus.MODEL_PATH, "rb") as f:
      self.assertEqual(_sha256(f.read()), MODEL_SHA256)
    with tempfile.TemporaryDirectory() as tmp:
      path = corpus.build_docs_model(os.path.join(tmp, "m.model"))
      with open(path, "rb") as f:
        self.assertEqual(_sha256(f.read()), MODEL_SHA256)
    self.assertLess(os.path.getsize(corpus.MODEL_PATH), 500_000)


class DocsTaskTest(absltest.TestCase):

  def _examples(self, n, lengths=None):
    task = seqio.get_mixture_or_task(st_moe.tasks.DOCS_TASK)
    ds = task.get_dataset(lengths or {"inputs": 128, "targets": 32}, split="validation",
                          shuffle=False, seed=1)
    return list(ds.take(n).as_numpy_iterator())

  def test_registered_with_the_docs_vocabulary(self):
    task = seqio.get_mixture_or_task(st_moe.tasks.DOCS_TASK)
    self.assertIn(st_moe.tasks.DOCS_TASK, st_moe.tasks.TASKS)
    for key in ("inputs", "targets"):
      self.assertIs(task.output_features[key].vocabulary, corpus.docs_vocabulary())
    self.assertCountEqual(task.splits, ["train", "validation"])

  def test_span_corruption_examples(self):
    noise = total = 0
    for ex in self._examples(30):
      inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
      self.assertEqual((inputs[-1], targets[-1]), (1, 1))  # EOS
      self.assertLessEqual((len(inputs), len(targets)), (128, 32))
      sentinels = lambda ids: [i for i in ids if i >= 8092]
      self.assertNotEmpty(sentinels(inputs))
      self.assertEqual(sentinels(inputs), list(range(8191, 8191 - len(sentinels(inputs)), -1)))
      self.assertEqual(sentinels(targets)[:len(sentinels(inputs))], sentinels(inputs))
      n_noise = len(targets) - 1 - len(sentinels(targets))
      noise += n_noise
      total += n_noise + len(inputs) - 1 - len(sentinels(inputs))
    self.assertAlmostEqual(noise / total, 0.15, delta=0.02)

  def test_through_t5_mesh_train_dataset_fn(self):
    # The path t5_mesh_transformer takes: packed examples, and the run's vocabulary from the task.
    ds = mesh_transformer.mesh_train_dataset_fn(
        st_moe.tasks.DOCS_TASK, {"inputs": 64, "targets": 16}, seed=0)
    ex = next(ds.as_numpy_iterator())
    self.assertEqual((ex["inputs"].shape, ex["targets"].shape), ((64,), (16,)))
    self.assertIn("inputs_segmentation", ex)
    self.assertGreater(int((ex["inputs"] != 0).sum()), 48)  # filled, not mostly padding
    self.assertEqual(t5_model_utils.get_vocabulary(st_moe.tasks.DOCS_TASK),
                     (corpus.docs_vocabulary(),) * 2)

  def test_golden_first_validation_example(self):
    """The first example puts back together into the first validation document's first tokens."""
    v = corpus.docs_vocabulary()
    ex = self._examples(1)[0]
    inputs, targets = ex["inputs"].tolist()[:-1], ex["targets"].tolist()[:-1]
    spans, current = {}, None
    for i in targets:
      if i >= 8092:
        current = i
        spans[current] = []
      else:
        spans[current].append(i)
    merged = [t for i in inputs for t in (spans[i] if i >= 8092 else [i])]
    first = corpus.split_documents("validation")[0]
    self.assertEqual(first["id"], GOLDEN_DOCUMENT)
    first_doc = first["text"]
    self.assertEqual(merged, v.encode(first_doc)[:len(merged)])
    self.assertEqual(v.decode(ex["inputs"].tolist()), GOLDEN_INPUTS)
    self.assertEqual(v.decode(ex["targets"].tolist()), GOLDEN_TARGETS)


# The first validation example (split "validation", shuffle=False, seed=1, lengths 128/32): a
# regression golden, recorded when the task was added; its correctness is the merge check above.
GOLDEN_DOCUMENT = "tensorflow/python/compiler/xla/xla.py"
GOLDEN_INPUTS = (
    "xla is an experimental library that provides XLA support APIs. Operations that indicate some "
    "error in <extra_id_0> graph. For example, XLA computation should not have any Placeholder op. "
    "XLA doesn't currently support reading of intermediate tensors, thus some ops are not "
    "supported. A Python function that builds a computation to <extra_id_1> input. If "
    "<extra_id_2> function takes n inputs, 'inputs' should be a list of n `Tensor`s. Known "
    "issues: <extra_id_3>, the implementation doesn't pass the user <extra_id_4> to the XLA "
    "compiler. As such, the XLA compiler generates a random <extra_id_5> uses it as a seed when "
    "compiling the <extra_id_6>")
GOLDEN_TARGETS = (
    "<extra_id_0> the users <extra_id_1> apply to the <extra_id_2> the <extra_id_3> When a "
    "tf.random operation is built with XLA <extra_id_4> provided seed <extra_id_5> number and "
    "<extra_id_6> operation")


if __name__ == "__main__":
  absltest.main()
