"""Text preprocessors for the benchmarks t5 has none for: ARC, WinoGrande, closed-book QA.

Each maps one raw TFDS example to `{"inputs": str, "targets": str, ...}` in t5's text-to-text
style (a task prefix, then "field: value" pairs). SuperGLUE, ANLI, XSum and CNN/DailyMail reuse
t5's `glue` and `summarize` preprocessors.
"""
import seqio
import tensorflow as tf


def _first_or_empty(answers: tf.Tensor) -> tf.Tensor:
  """`<string>[]`: the first of `<string>[N]` answers, or "" when N == 0 (unlabelled splits)."""
  return tf.strings.reduce_join(answers[:1])


@seqio.map_over_dataset
def arc(x):
  """ai2_arc (Easy or Challenge) as text-to-text; the target is the text of the correct choice.

  {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": [0, 1]},
   "answerKey": 1}
  -> {"inputs": "arc question: Which is a gas? choices: (A) ice (B) steam", "targets": "steam"}

  Choices are lettered A, B, C, ... in order (TFDS maps ARC's "1".."4" labels to "A".."D", always
  in order); the target is the choice whose `choices/label` equals `answerKey` ("" if none).

  Args:
    x: a raw ai2_arc example.

  Returns:
    the example with "inputs", "targets" (str) and "id".
  """
  texts = x["choices"]["text"]  # <string>[num_choices]
  labels = x["choices"]["label"]  # <int64>[num_choices]
  positions = tf.range(tf.size(texts))  # <int32>[num_choices]
  letters = tf.strings.unicode_encode(tf.expand_dims(65 + positions, 1), "UTF-8")  # A, B, ...
  marked = tf.strings.join(["(", letters, ") ", texts])
  choices = tf.strings.reduce_join(marked, separator=" ")
  inputs = tf.strings.join(["arc question: ", x["question"], " choices: ", choices])
  correct = tf.reshape(tf.where(tf.equal(labels, x["answerKey"])), [-1])  # <int64>[0 or 1]
  correct = tf.boolean_mask(correct, correct < tf.cast(tf.size(texts), tf.int64))
  targets = _first_or_empty(tf.gather(texts, correct))
  return {"inputs": inputs, "targets": targets, "id": x["id"]}


@seqio.map_over_dataset
def winogrande(x):
  """WinoGrande as text-to-text; the target is the option that fills the blank ("_").

  {"sentence": "Ann gave Sue a gift because _ was kind.", "option1": "Ann", "option2": "Sue",
   "label": 0}
  -> {"inputs": "winogrande sentence: Ann gave Sue a gift because _ was kind. option1: Ann "
                "option2: Sue", "targets": "Ann"}

  Unlabelled examples (label -1, the test split) get the target "<unk>", as in t5's glue.

  Args:
    x: a raw winogrande example ("label" is the ClassLabel index of "1"/"2").

  Returns:
    the example with "inputs" and "targets" (str).
  """
  inputs = tf.strings.join(["winogrande sentence: ", x["sentence"], " option1: ", x["option1"],
                            " option2: ", x["option2"]])
  options = tf.stack([x["option1"], x["option2"], "<unk>"])
  label = tf.where(x["label"] < 0, tf.constant(2, x["label"].dtype), x["label"])
  return {"inputs": inputs, "targets": tf.gather(options, label)}


def _get(x, path):
  for key in path.split("/"):
    x = x[key]
  return x


def closed_book_qa(dataset: tf.data.Dataset, benchmark: str, answers_key: str,
                   target_key: str = "") -> tf.data.Dataset:
  """Closed-book question answering: the question alone is the input (no context).

  {"question": "who wrote hamlet?", "answers": ["Shakespeare", "William Shakespeare"]}
  -> {"inputs": "trivia_qa question: who wrote hamlet?", "targets": "Shakespeare",
      "answers": ["Shakespeare", "William Shakespeare"]}

  The target is the first gold answer; all of them stay in "answers" for the metric
  (t5's `postprocessors.qa` reads them).

  Args:
    dataset: raw examples with "question" and the answers under `answers_key`.
    benchmark: the input prefix, e.g. "nq", "web_questions" or "trivia_qa".
    answers_key: path of the `<string>[N]` gold answers, "/" between nested keys (e.g.
      "answer/aliases").
    target_key: optional path of a `<string>[]` canonical answer (TriviaQA's "answer/value"):
      it becomes the target and is put first in "answers".

  Returns:
    the dataset with "inputs", "targets" (str) and "answers" (`<string>[N]`).
  """

  def fn(x):
    answers = _get(x, answers_key)  # <string>[N]
    if target_key:
      answers = tf.concat([[_get(x, target_key)], answers], axis=0)  # <string>[N + 1]
    return {"inputs": tf.strings.join([benchmark, " question: ", x["question"]]),
            "targets": _first_or_empty(answers),
            "answers": answers}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
