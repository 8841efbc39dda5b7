"""The embedded downstream task `st_moe_embedded_pydoc_topic`: which help() topic is this passage from?

(`st_moe_embedded_docs_pydoc_topic` is the same task in the docs corpus's 8k vocabulary, for the
models of `--scale=small` that pretrain on that corpus.)

A four-way text classification over Python's own documentation (`pydoc_data.topics`, which ships
with Python), so fine-tuning and evaluation by decoding run with nothing downloaded, with the
embedded vocabulary (`vocab.embedded_vocabulary()`) of the pretraining task
`st_moe_embedded_span_corruption`:

  {"passage": "The debugger recognizes the following commands. Most commands can be ...",
   "topic": "debugger"}
  -> {"inputs": "pydoc topic passage: The debugger recognizes the following commands. ...",
      "targets": "debugger"}

Examples: each of the four `TOPICS` is cut into consecutive, non-overlapping passages of
`PASSAGE_WORDS` whitespace-separated words (heading underlines and table borders dropped), and the
first `PASSAGES_PER_TOPIC` of them are kept: 90 per topic, 360 in all, balanced by construction,
so the majority-class (or any constant) baseline scores exactly `MAJORITY_ACCURACY` = 25.0.
Every `VALIDATION_EVERY`-th passage of a topic (positions 4, 9, 14, ...) is held out: 288 train,
72 validation, fixed by the text alone (no randomness, no hashing).

Why this task: the label needs the passage's content (its vocabulary and subject: compound
statements, the pdb debugger, the format mini-language, the data model's special methods), not a
surface cue (all passages have the same length and form; the topic's name is rarely in the text);
the four topics are the distinct subjects among the help() topics long enough for 90 passages; the
target is one to three pieces of the embedded vocabulary, so decoding is short; and a naive Bayes
bag of words on the train split reaches 95.8% on validation, so the task is learnable from 288
examples. The four documents are in the train split of the pretraining corpus (as C4 text would
be for a real downstream task); the labels are not.

Measured (st_moe_tiny pretrained 400 steps on st_moe_embedded_span_corruption, then fine-tuned with
finetune.gin, 16 sequences of 128 + 8 tokens per step, decoded greedily with eval.gin): validation
accuracy 90.3 after 100 steps and 94.4 after 300 at a constant learning rate of 1e-2; 33.3 after
300 and 80.6 after 600 at finetune.gin's 1e-3.
"""
import re

from pydoc_data import topics
import seqio
import tensorflow as tf

NAME = "embedded_pydoc_topic"
DOCS_NAME = "embedded_docs_pydoc_topic"  # the same task in the docs corpus's vocabulary
TOPICS = ("compound", "debugger", "formatstrings", "specialnames")
PASSAGE_WORDS = 32
PASSAGES_PER_TOPIC = 90
VALIDATION_EVERY = 5
MAJORITY_ACCURACY = 100.0 / len(TOPICS)  # balanced classes: any constant answer scores this
INPUT_PREFIX = "pydoc topic passage: "
# reST heading underlines ("*****", "=====", "-----") and table borders ("+----+----+", "|===|").
_UNDERLINE = re.compile(r"[*=\-+|]{3,}")


def _passages_of(topic: str) -> list[str]:
  """The first PASSAGES_PER_TOPIC passages of PASSAGE_WORDS words of one pydoc topic."""
  words = [w for w in topics.topics[topic].split() if not _UNDERLINE.fullmatch(w)]
  if len(words) < PASSAGE_WORDS * PASSAGES_PER_TOPIC:
    raise ValueError(
        f"pydoc topic {topic!r} has {len(words)} words, fewer than PASSAGES_PER_TOPIC="
        f"{PASSAGES_PER_TOPIC} x PASSAGE_WORDS={PASSAGE_WORDS}: this Python's pydoc_data "
        "differs from 3.11's; lower PASSAGES_PER_TOPIC.")
  return [" ".join(words[i * PASSAGE_WORDS:(i + 1) * PASSAGE_WORDS])
          for i in range(PASSAGES_PER_TOPIC)]


def examples(split: str) -> list[dict[str, str]]:
  """The raw examples of one split, topic by topic in `TOPICS` order, passages in text order.

  Args:
    split: "train" or "validation" (every VALIDATION_EVERY-th passage of each topic).

  Returns:
    a list of {"passage": str, "topic": str}.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r}: the task {NAME} has the splits 'train' and "
                     "'validation'.")
  held_out = split == "validation"
  return [{"passage": p, "topic": topic}
          for topic in TOPICS for i, p in enumerate(_passages_of(topic))
          if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == held_out]


def _dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed  # one "file" per split; the task shuffles examples in training.
  rows = examples(split)
  return tf.data.Dataset.from_tensor_slices({
      "passage": [r["passage"] for r in rows], "topic": [r["topic"] for r in rows]})


def source() -> seqio.DataSource:
  """The examples as a seqio source with the splits "train" (288) and "validation" (72)."""
  return seqio.FunctionDataSource(
      _dataset_fn, splits=["train", "validation"],
      num_input_examples={s: len(examples(s)) for s in ("train", "validation")})


@seqio.map_over_dataset
def to_text(x):
  """{"passage", "topic"} -> {"inputs": "pydoc topic passage: <passage>", "targets": <topic>}."""
  return {"inputs": tf.strings.join([INPUT_PREFIX, x["passage"]]), "targets": x["topic"]}
