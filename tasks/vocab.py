"""Vocabularies of st-moe's tasks: T5's default, and a small embedded one that needs no download.

The registered tasks default to T5's SentencePiece vocabulary (`cc_all.32000` with 100 extra ids,
the file `t5.data.get_default_vocabulary()` names, gs://t5-data/vocabs/cc_all.32000/
sentencepiece.model, read on first use). Offline, point them at a local copy with the environment
variable ST_MOE_T5_VOCABULARY=/path/to/sentencepiece.model (read when the tasks are registered);
if the file cannot be read, the first use raises `VocabularyNotAvailableError` naming the file and
both ways out (a local copy, or the embedded tasks), instead of a GCS or NotFound traceback. The embedded vocabulary is a
SentencePiece unigram model of 2,000 pieces trained offline once on the train split of
`pydoc_data.topics` (text that ships with Python) and shipped as `tasks/data/pydoc_topics_2k.model`;
with 100 extra ids (sentinels for span corruption) it has 2,100 ids. `build_embedded_model()`
regenerates the file deterministically (single thread, fixed seed sentence order).

Why SentencePiece rather than bytes: the model sees ~4x more text per 128-token sequence than with
bytes, decoded predictions read as words, and the demo exercises the same vocabulary type (with
T5's pad=0 / eos=1 / unk=2 layout and sentinels at the top of the id range) as the real runs.
"""
import functools
import os

from pydoc_data import topics
import seqio
import t5.data
import tensorflow as tf

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
EMBEDDED_MODEL_PATH = os.path.join(DATA_DIR, "pydoc_topics_2k.model")
EMBEDDED_VOCAB_SIZE = 2000  # pieces, before the extra ids
EXTRA_IDS = 100
# Every VALIDATION_EVERY-th pydoc topic (in sorted key order) is held out for validation.
VALIDATION_EVERY = 10


T5_VOCABULARY_ENV = "ST_MOE_T5_VOCABULARY"
EMBEDDED_TASKS = ("st_moe_embedded_span_corruption", "st_moe_embedded_pydoc_topic")


class VocabularyNotAvailableError(RuntimeError):
  """A task's SentencePiece vocabulary file cannot be read (offline, no gs:// access, missing)."""


def _mixture_name():
  """The run's MIXTURE_NAME gin macro, if gin binds one (t5_mesh_transformer runs); else None."""
  try:
    import gin  # pylint: disable=g-import-not-at-top
    return gin.query_parameter("%MIXTURE_NAME")
  except (ImportError, ValueError):
    return None


def unavailable_message(path: str, cause: str) -> str:
  """The text of VocabularyNotAvailableError: the file, who needs it, and what to do."""
  mixture = _mixture_name()
  run = f" (this run: MIXTURE_NAME = {mixture!r})" if isinstance(mixture, str) else ""
  return (
      f"The vocabulary {path} cannot be read ({cause}). The task being run needs it to tokenize"
      f"{run}: every st-moe task registered with T5's vocabulary (C4 span corruption, the "
      "downstream tasks, the mixtures st_moe_pretrain, st_moe_super_glue, st_moe_finetune) "
      "does. Either copy the file once to where this machine can read it, e.g.\n"
      f"  gsutil cp {t5.data.DEFAULT_SPM_PATH} /data/t5_vocab/sentencepiece.model\n"
      f"and set {T5_VOCABULARY_ENV}=/data/t5_vocab/sentencepiece.model in the run's environment, "
      "or train on the embedded vocabulary, which ships with st-moe: "
      f"--gin_param=\"MIXTURE_NAME='{EMBEDDED_TASKS[0]}'\" (pretraining) or "
      f"'{EMBEDDED_TASKS[1]}' (fine-tuning and decoding).")


class CheckedSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A seqio.SentencePieceVocabulary whose file, if unreadable, raises VocabularyNotAvailableError.

  Equal to a plain seqio.SentencePieceVocabulary of the same file and extra ids (seqio compares
  their settings), so mixtures and tests see T5's vocabulary.
  """

  def _model_context(self):
    try:
      return super()._model_context()
    except (tf.errors.OpError, OSError) as e:  # NotFound; FailedPrecondition (no network) ...
      first = (getattr(e, "message", None) or str(e)).strip().split("\n")[0][:300]
      raise VocabularyNotAvailableError(
          unavailable_message(self.sentencepiece_model_file, f"{type(e).__name__}: {first}")
      ) from None


def default_vocabulary() -> seqio.Vocabulary:
  """T5's vocabulary (cc_all.32000 + 100 extra ids): the default of every registered task family.

  The file is $ST_MOE_T5_VOCABULARY if set (a local copy), else T5's gs:// path.
  """
  path = os.environ.get(T5_VOCABULARY_ENV) or t5.data.DEFAULT_SPM_PATH
  return CheckedSentencePieceVocabulary(path, extra_ids=t5.data.DEFAULT_EXTRA_IDS)


def embedded_texts(split: str) -> list[str]:
  """The documents of `pydoc_data.topics` in one split of the embedded corpus.

  Args:
    split: "train" or "validation" (every 10th distinct document in key order).

  Returns:
    the documents as a list of str, in sorted key order.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r}: the embedded corpus has the splits 'train' and "
                     "'validation'.")
  docs = list(dict.fromkeys(text for _, text in sorted(topics.topics.items())))  # 2 keys share 1
  held_out = split == "validation"
  return [d for i, d in enumerate(docs) if (i % VALIDATION_EVERY == 0) == held_out]


@functools.lru_cache(maxsize=None)
def embedded_vocabulary(extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """The small local SentencePiece vocabulary (2,000 pieces + `extra_ids` sentinels).

  Ids follow T5: 0 pad, 1 eos, 2 unk; the extra ids are the top `extra_ids` ids, so T5's
  `span_corruption` uses them as sentinels. The same object is returned for equal arguments.

  Args:
    extra_ids: number of sentinel ids appended after the SentencePiece pieces.

  Returns:
    a seqio.SentencePieceVocabulary over `tasks/data/pydoc_topics_2k.model`.
  """
  if not os.path.exists(EMBEDDED_MODEL_PATH):
    raise FileNotFoundError(
        f"The embedded vocabulary {EMBEDDED_MODEL_PATH} is missing; regenerate it with "
        "`python -c 'from st_moe.tasks import vocab; vocab.build_embedded_model()'`.")
  return seqio.SentencePieceVocabulary(EMBEDDED_MODEL_PATH, extra_ids=extra_ids)


_TRAIN_SCRIPT = """
import sys
import sentencepiece as spm
corpus, prefix = sys.argv[1], sys.argv[2]
vocab_size, coverage = int(sys.argv[3]), float(sys.argv[4])
spm.SentencePieceTrainer.train(
    input=corpus, model_prefix=prefix, model_type="unigram", vocab_size=vocab_size,
    character_coverage=coverage, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
    shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
"""


def train_sentencepiece(lines, output_path: str, vocab_size: int,
                        character_coverage: float = 1.0) -> str:
  """Trains a SentencePiece unigram model on `lines`, byte-identically on every run.

  T5's id layout (pad 0, eos 1, unk 2, no bos). Deterministic: one thread, lines in the given
  order, no sampling inside SentencePiece. The trainer runs in a fresh Python process that imports
  only `sentencepiece` (in a process that has loaded TensorFlow and t5, SentencePiece's trainer can
  crash on protobuf/abseil symbol clashes), in a temporary folder with relative paths (the model
  records its trainer's input and prefix names, which must not vary).

  Args:
    lines: the training text, one sentence or paragraph per item (empty ones are dropped).
    output_path: where to write the `.model` file (local or gs://).
    vocab_size: number of pieces, including pad/eos/unk.
    character_coverage: SentencePiece's share of characters the pieces must cover.

  Returns:
    output_path.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "corpus.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(line for line in lines if line) + "\n")
    subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, "corpus.txt", "spm", str(vocab_size),
                    repr(character_coverage)], check=True, capture_output=True, cwd=tmp)
    with open(os.path.join(tmp, "spm.model"), "rb") as f:
      model = f.read()
  with tf.io.gfile.GFile(output_path, "wb") as f:
    f.write(model)
  return output_path


def build_embedded_model(output_path: str = EMBEDDED_MODEL_PATH,
                         vocab_size: int = EMBEDDED_VOCAB_SIZE) -> str:
  """Trains the embedded SentencePiece model on the train split of the embedded corpus (every
  character covered); byte-identical on every run (`train_sentencepiece`). Returns output_path."""
  lines = [line.strip() for doc in embedded_texts("train") for line in doc.split("\n")]
  return train_sentencepiece(lines, output_path, vocab_size, character_coverage=1.0)
