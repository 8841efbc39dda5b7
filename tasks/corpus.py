"""The docs corpus: English prose from the docstrings and comments of pinned packages.

`st_moe_embedded_docs_span_corruption` trains on it: 12.4 MB of text in 4,965 documents (26.7x
the 0.47 MB of `pydoc_data.topics` the small embedded task uses), with no download. It is extracted
(`st_moe.tasks.corpus_extract`) from the `.py` files of packages pinned in `requirements.lock` and
shipped compressed as `tasks/data/docs_corpus.jsonl.xz` (one JSON object per line, sorted by id:
{"id": "<package>/<path>", "source_sha256": ..., "text": paragraphs joined by "\\n"}), so reading it
needs neither those packages nor the extraction's minute or more of parsing. The decompressed file
has the SHA-256 `CORPUS_SHA256`; `build_corpus()` regenerates it from the installed packages, and
`tests/corpus_test.py` checks both.

Split by document: a document is in validation when the SHA-256 of its id is 0 modulo
`VALIDATION_MODULUS` (about 1 in 20). Near-duplicate paragraphs were removed over the whole corpus
before the split, so no validation paragraph repeats a train paragraph. Each split lists its
documents in the order of the SHA-256 of their ids, which mixes packages: any prefix of a split is
a sample of all of it (eval on the first N batches sees every package, not just the first one).

Its vocabulary (`docs_vocabulary()`): a SentencePiece unigram model of 8,092 pieces trained on a
fixed sample of train paragraphs and shipped as `tasks/data/docs_8k.model`; with T5's layout (pad
0, eos 1, unk 2) and 100 extra ids (sentinels) it has 8,192 ids, a multiple of 128 (the vocabulary
dimension splits evenly over TPU cores). `build_docs_model()` regenerates it byte-identically.

Regenerate both:
  python -m st_moe.tasks.corpus --corpus --vocabulary
"""
import functools
import hashlib
import json
import lzma
import os
from typing import Optional

import seqio
import tensorflow as tf

from st_moe.tasks import vocab

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CORPUS_PATH = os.path.join(DATA_DIR, "docs_corpus.jsonl.xz")
# SHA-256 of the decompressed docs_corpus.jsonl (what build_corpus writes, before compression).
CORPUS_SHA256 = "9936fc3e218e23f4cc2a706f9f02bfe48d03050b334d959a458ebb3bc547a3a4"
MODEL_PATH = os.path.join(DATA_DIR, "docs_8k.model")
VOCAB_SIZE = 8092  # SentencePiece pieces including pad/eos/unk; + EXTRA_IDS = 8192 ids
EXTRA_IDS = 100
VALIDATION_MODULUS = 20
# The vocabulary trains on the train paragraphs whose SHA-256 is 0 modulo this (about 1 in 4).
VOCAB_SAMPLE_MODULUS = 4
SPLITS = ("train", "validation")


def _id_hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def encode_documents(documents: list[dict]) -> bytes:
  """The canonical JSON-lines bytes of documents (one object per line, sorted keys, UTF-8)."""
  lines = [json.dumps(d, ensure_ascii=False, sort_keys=True) for d in documents]
  return ("\n".join(lines) + "\n").encode("utf-8")


@functools.lru_cache(maxsize=None)
def _read(path: str) -> tuple[dict, ...]:
  with tf.io.gfile.GFile(path, "rb") as f:
    data = lzma.decompress(f.read())
  return tuple(json.loads(line) for line in data.decode("utf-8").splitlines())


def documents(path: str = CORPUS_PATH) -> tuple[dict, ...]:
  """All documents of the corpus, sorted by id (read once per process).

  Args:
    path: the compressed JSON-lines file (local or gs://).

  Returns:
    a tuple of {"id", "source_sha256", "text"} dicts.
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"The docs corpus {path} is missing; regenerate it with "
        "`python -m st_moe.tasks.corpus --corpus` (needs the packages of requirements.lock).")
  return _read(path)


def split_of(document_id: str) -> str:
  """"validation" if the SHA-256 of the id is 0 modulo VALIDATION_MODULUS, else "train"."""
  return "validation" if _id_hash(document_id) % VALIDATION_MODULUS == 0 else "train"


def split_documents(split: str, path: str = CORPUS_PATH) -> list[dict]:
  """The documents of one split, in the order of the SHA-256 of their ids.

  Args:
    split: "train" or "validation".
    path: the compressed corpus file.

  Returns:
    the split's documents (dicts with "id" and "text").
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: the docs corpus has the splits 'train' and 'validation'.")
  docs = [d for d in documents(path) if split_of(d["id"]) == split]
  return sorted(docs, key=lambda d: _id_hash(d["id"]))


def split_texts(split: str, path: str = CORPUS_PATH) -> list[str]:
  """The texts of `split_documents(split)`."""
  return [d["text"] for d in split_documents(split, path)]


def build_corpus(output_path: str = CORPUS_PATH, check_versions: bool = True) -> str:
  """Extracts the corpus from the installed packages and writes it compressed.

  Args:
    output_path: where to write the `.jsonl.xz` file (local or gs://).
    check_versions: refuse package versions other than the pinned ones.

  Returns:
    the SHA-256 of the decompressed JSON lines (equal to CORPUS_SHA256 with the lock installed).
  """
  from st_moe.tasks import corpus_extract  # pylint: disable=g-import-not-at-top
  data = encode_documents(corpus_extract.extract_documents(check_versions=check_versions))
  # xz preset 9 with a single-threaded encoder: the same bytes for the same input and liblzma.
  with tf.io.gfile.GFile(output_path, "wb") as f:
    f.write(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9))
  _read.cache_clear()
  return hashlib.sha256(data).hexdigest()


def vocabulary_training_lines(path: str = CORPUS_PATH) -> list[str]:
  """The train paragraphs the vocabulary is trained on: a fixed sample, in corpus order."""
  lines = []
  for doc in documents(path):
    if split_of(doc["id"]) != "train":
      continue
    lines.extend(p for p in doc["text"].split("\n") if _id_hash(p) % VOCAB_SAMPLE_MODULUS == 0)
  return lines


def build_docs_model(output_path: str = MODEL_PATH, vocab_size: int = VOCAB_SIZE,
                     corpus_path: str = CORPUS_PATH) -> str:
  """Trains the docs vocabulary on `vocabulary_training_lines()` (character coverage 0.9999: the
  corpus has rare symbols no piece needs); byte-identical on every run
  (`vocab.train_sentencepiece`).

  Args:
    output_path: where to write the `.model` file (local or gs://).
    vocab_size: number of pieces, including pad/eos/unk.
    corpus_path: the compressed corpus.

  Returns:
    output_path.
  """
  return vocab.train_sentencepiece(vocabulary_training_lines(corpus_path), output_path,
                                   vocab_size, character_coverage=0.9999)


@functools.lru_cache(maxsize=None)
def docs_vocabulary(extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """The docs corpus's SentencePiece vocabulary (8,092 pieces + `extra_ids` sentinels).

  Ids follow T5: 0 pad, 1 eos, 2 unk; the extra ids are the top `extra_ids` ids, so T5's
  `span_corruption` uses them as sentinels. The same object is returned for equal arguments.

  Args:
    extra_ids: number of sentinel ids appended after the pieces.

  Returns:
    a seqio.SentencePieceVocabulary over `tasks/data/docs_8k.model`.
  """
  if not os.path.exists(MODEL_PATH):
    raise FileNotFoundError(
        f"The docs vocabulary {MODEL_PATH} is missing; regenerate it with "
        "`python -m st_moe.tasks.corpus --vocabulary`.")
  return seqio.SentencePieceVocabulary(MODEL_PATH, extra_ids=extra_ids)


def _dataset_fn(split: str, shuffle_files: bool = False,
                seed: Optional[int] = None) -> tf.data.Dataset:
  """One element {"text": <string>[]} per document; shuffled over all documents if asked."""
  texts = split_texts(split)
  ds = tf.data.Dataset.from_tensor_slices({"text": texts})
  if shuffle_files:
    ds = ds.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
  return ds


def docs_source() -> seqio.DataSource:
  """The docs corpus as a seqio source with the splits "train" and "validation"."""
  # No num_input_examples: counting would read the corpus whenever st_moe.tasks is imported.
  return seqio.FunctionDataSource(_dataset_fn, splits=list(SPLITS))


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Regenerate the docs corpus and its vocabulary.")
  parser.add_argument("--corpus", action="store_true", help=f"rewrite {CORPUS_PATH}")
  parser.add_argument("--vocabulary", action="store_true", help=f"rewrite {MODEL_PATH}")
  args = parser.parse_args(argv)
  if not (args.corpus or args.vocabulary):
    parser.error("nothing to do: pass --corpus, --vocabulary or both.")
  if args.corpus:
    digest = build_corpus()
    print(f"{CORPUS_PATH}: SHA-256 of the text {digest}"
          + ("" if digest == CORPUS_SHA256 else f" (differs from CORPUS_SHA256 {CORPUS_SHA256})"))
  if args.vocabulary:
    print(build_docs_model())


if __name__ == "__main__":
  main()
