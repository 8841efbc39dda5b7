"""Golden preprocessing and metrics of every downstream st-moe task, on hand-written examples.

For each benchmark a few raw examples shaped like its TFDS features are injected into the task (the
same definition as the registered one, with the embedded vocabulary): the first must preprocess to
exactly the input/target text written here; and seqio's Evaluator, fed the gold targets as model
predictions, must score 100 on every metric, and fed a wrong answer, less.
"""
import contextlib
import functools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import seqio
import tensorflow as tf

import st_moe.tasks
from st_moe.tasks import families

SUFFIX = "_golden_test"
i32, i64 = np.int32, np.int64


def _sg(idx, **kw):
  return dict(idx=i32(idx), **kw)


# benchmark -> (raw examples, (inputs, targets) the first one must preprocess to)
EXAMPLES = {
    "super_glue_boolq": (
        [_sg(0, question="is the sky blue", passage="The sky is blue on clear days.",
             label=i64(1)),
         _sg(1, question="is fire cold", passage="Fire is hot.", label=i64(0))],
        ("boolq passage: The sky is blue on clear days. question: is the sky blue", "True")),
    "super_glue_cb": (
        [_sg(0, premise="It rained.", hypothesis="The ground is wet.", label=i64(0)),
         _sg(1, premise="It is dry.", hypothesis="It rained.", label=i64(1)),
         _sg(2, premise="Bob left.", hypothesis="Bob is tall.", label=i64(2))],
        ("cb hypothesis: The ground is wet. premise: It rained.", "entailment")),
    "super_glue_copa": (
        [_sg(0, premise="The man broke his toe.", question="cause",
             choice1="He dropped a hammer on his foot.", choice2="He got a hole in his sock.",
             label=i64(0)),
         _sg(1, premise="I pushed the door.", question="effect", choice1="It opened.",
             choice2="It sang.", label=i64(0))],
        ("copa choice1: He dropped a hammer on his foot. choice2: He got a hole in his sock. "
         "premise: The man broke his toe. question: cause", "choice1")),
    "super_glue_multirc": (
        [dict(question="Who ran?", answer="Bob", paragraph="<b>Sent 1: </b>Bob ran.<br>",
              idx=dict(paragraph=i32(0), question=i32(0), answer=i32(0)), label=i64(1)),
         dict(question="Who ran?", answer="Ann", paragraph="<b>Sent 1: </b>Bob ran.<br>",
              idx=dict(paragraph=i32(0), question=i32(0), answer=i32(1)), label=i64(0)),
         dict(question="Who sat?", answer="Ann", paragraph="Ann sat.",
              idx=dict(paragraph=i32(1), question=i32(1), answer=i32(0)), label=i64(1))],
        ("multirc question: Who ran? answer: Bob paragraph: Sent 1: Bob ran. ", "True")),
    "super_glue_record": (
        [dict(passage="Penguins live in the south.\n@highlight\nThey swim",
              query="A @placeholder is a bird.", entities=["penguin", "potato"],
              answers=["penguin"], idx=dict(passage=i32(0), query=i32(0))),
         dict(passage="Paris is in France.", query="@placeholder is a city.",
              entities=["Paris", "France"], answers=["Paris"],
              idx=dict(passage=i32(1), query=i32(1)))],
        ("record query: A @placeholder is a bird. entities: penguin, potato passage: Penguins "
         "live in the south. They swim", "penguin")),
    "super_glue_rte": (
        [_sg(0, premise="A cat sat.", hypothesis="An animal sat.", label=i64(0)),
         _sg(1, premise="A cat sat.", hypothesis="A dog sat.", label=i64(1))],
        ("rte hypothesis: An animal sat. premise: A cat sat.", "entailment")),
    "super_glue_wic": (
        [_sg(0, sentence1="He ran a mile.", sentence2="The river ran dry.", word="run",
             start1=i32(3), end1=i32(6), start2=i32(10), end2=i32(13), label=i64(0)),
         _sg(1, sentence1="I ran home.", sentence2="She ran fast.", word="run",
             start1=i32(2), end1=i32(5), start2=i32(4), end2=i32(7), label=i64(1))],
        ("wic sentence1: He ran a mile. sentence2: The river ran dry. word: run", "False")),
    "super_glue_wsc": (
        [_sg(0, text="Mark told Pete many lies about himself , which Pete included in his book .",
             span1_text="Mark", span1_index=i32(0), span2_text="himself", span2_index=i32(6),
             label=i64(1)),
         _sg(1, text="The cup fell on the rug because it was heavy .", span1_text="rug",
             span1_index=i32(5), span2_text="it", span2_index=i32(7), label=i64(0))],
        ("wsc text: * Mark * told Pete many lies about # himself # , which Pete included in "
         "his book .", "True")),
    "arc_easy": (
        [dict(id="q1", question="Which is a gas?",
              choices=dict(text=["ice", "steam", "rock"], label=np.array([0, 1, 2], i64)),
              answerKey=i64(1)),
         dict(id="q2", question="What do plants need?",
              choices=dict(text=["light", "salt", "sand", "oil"],
                           label=np.array([0, 1, 2, 3], i64)), answerKey=i64(0))],
        ("arc question: Which is a gas? choices: (A) ice (B) steam (C) rock", "steam")),
    "arc_challenge": (
        [dict(id="c1", question="Which force pulls objects down?",
              choices=dict(text=["friction", "gravity", "magnetism", "tension"],
                           label=np.array([0, 1, 2, 3], i64)), answerKey=i64(1)),
         dict(id="c2", question="What is H2O?",
              choices=dict(text=["salt", "water"], label=np.array([0, 1], i64)),
              answerKey=i64(1))],
        ("arc question: Which force pulls objects down? choices: (A) friction (B) gravity "
         "(C) magnetism (D) tension", "gravity")),
    "winogrande": (
        [dict(sentence="Ann thanked Sue because _ had helped her.", option1="Ann", option2="Sue",
              label=i64(1)),
         dict(sentence="The trophy did not fit the case because _ was big.", option1="trophy",
              option2="case", label=i64(0))],
        ("winogrande sentence: Ann thanked Sue because _ had helped her. option1: Ann "
         "option2: Sue", "Sue")),
    "anli_r3": (
        [dict(uid="u1", context="The bank closed at noon.", hypothesis="The bank was open at 1pm.",
              label=i64(2)),
         dict(uid="u2", context="Tom ate.", hypothesis="Tom had food.", label=i64(0))],
        ("anli context: The bank closed at noon. hypothesis: The bank was open at 1pm.",
         "contradiction")),
    "xsum": (
        [dict(document="The council approved the new park on Monday.",
              summary="A new park was approved."),
         dict(document="Rain fell all week in the north.", summary="It rained a lot.")],
        ("summarize: The council approved the new park on Monday.", "A new park was approved.")),
    "cnn_dailymail": (
        [dict(article="The mayor opened a bridge today. Crowds cheered.",
              highlights="Mayor opens bridge .\nCrowds cheer .", id="a1", publisher="cnn"),
         dict(article="A storm hit the coast.", highlights="Storm hits coast .", id="a2",
              publisher="dm")],
        ("summarize: The mayor opened a bridge today. Crowds cheered.",
         "Mayor opens bridge .\nCrowds cheer .")),
    "web_questions": (
        [dict(question="what is the capital of france?", answers=["Paris"], url="u1"),
         dict(question="who wrote hamlet?", answers=["Shakespeare", "William Shakespeare"],
              url="u2")],
        ("web_questions question: what is the capital of france?", "Paris")),
    "natural_questions_open": (
        [dict(question="who wrote hamlet", answer=["William Shakespeare", "Shakespeare"]),
         dict(question="largest planet", answer=["Jupiter"])],
        ("nq question: who wrote hamlet", "William Shakespeare")),
    "trivia_qa": (
        [dict(question="Which planet is red?", question_id="t1",
              answer=dict(aliases=["The Red Planet", "Mars"], value="Mars")),
         dict(question="What is the capital of Japan?", question_id="t2",
              answer=dict(aliases=["Tokyo"], value="Tokyo"))],
        ("trivia_qa question: Which planet is red?", "Mars")),
}


def _dataset_of(examples):
  """A tf.data.Dataset yielding the raw example dicts in order (ragged lists allowed)."""
  datasets = [tf.data.Dataset.from_tensors(ex) for ex in examples]
  return functools.reduce(lambda a, b: a.concatenate(b), datasets)


@contextlib.contextmanager
def injected(task_name, examples, split="validation"):
  """Replaces the task's source by `examples` (split `split`) inside the scope."""
  task = seqio.get_mixture_or_task(task_name)
  saved = task._source  # pylint: disable=protected-access
  task._source = seqio.FunctionDataSource(  # pylint: disable=protected-access
      lambda split, shuffle_files, seed=None: _dataset_of(examples), splits=[split])
  try:
    yield task
  finally:
    task._source = saved  # pylint: disable=protected-access


class _Predict(seqio.evaluation.PredictFnCallable):

  def __init__(self, task, texts):
    self._vocab = task.output_features["targets"].vocabulary
    self._texts = texts

  def __call__(self, dataset=None, model_feature_lengths=None):
    # Like a decoder's output: ids, EOS, then padding to one length (seqio stacks them).
    ids = [self._vocab.encode(t) + [self._vocab.eos_id] for t in self._texts]
    length = max(len(x) for x in ids)
    return [(i, x + [0] * (length - len(x))) for i, x in enumerate(ids)]


def evaluate(task_name, examples, predictions_fn):
  """Metrics of seqio's Evaluator when the model predicts predictions_fn(target texts)."""
  with injected(task_name, examples) as task:
    targets = [ex["targets_pretokenized"].decode("utf-8") for ex in
               task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator()]
    evaluator = seqio.evaluation.Evaluator(
        task_name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split="validation", async_compute_metrics=False, use_memory_cache=False)
    results = evaluator.evaluate(compute_metrics=True,
                                 predict_fn=_Predict(task, predictions_fn(targets)))
    return results[0].result()[task_name]


class TasksGoldenTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.names = families.add_tasks(st_moe.tasks.embedded_vocabulary(), suffix=SUFFIX)

  @classmethod
  def tearDownClass(cls):
    families.remove(cls.names)
    super().tearDownClass()

  def test_every_downstream_benchmark_has_a_golden(self):
    self.assertCountEqual(EXAMPLES, [b.name for b in families.benchmarks()])

  @parameterized.named_parameters((name, name) for name in EXAMPLES)
  def test_golden_preprocessing(self, benchmark):
    examples, (inputs, targets) = EXAMPLES[benchmark]
    name = families.task_name(benchmark, SUFFIX)
    with injected(name, examples[:1]) as task:
      out = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    self.assertLen(out, 1)
    self.assertEqual(out[0]["inputs_pretokenized"].decode("utf-8"), inputs)
    self.assertEqual(out[0]["targets_pretokenized"].decode("utf-8"), targets)
    vocab = task.output_features["targets"].vocabulary
    self.assertEqual(out[0]["targets"].tolist(), vocab.encode(targets) + [vocab.eos_id])

  def test_record_makes_one_example_per_answer(self):
    example = dict(EXAMPLES["super_glue_record"][0][0], answers=["penguin", "pigeon"])
    with injected(families.task_name("super_glue_record", SUFFIX), [example]) as task:
      out = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    self.assertEqual([o["targets_pretokenized"] for o in out], [b"penguin", b"pigeon"])

  @parameterized.named_parameters((name, name) for name in EXAMPLES)
  def test_metrics_perfect_on_gold_and_lower_on_wrong(self, benchmark):
    name = families.task_name(benchmark, SUFFIX)
    examples = EXAMPLES[benchmark][0]
    gold = evaluate(name, examples, lambda targets: targets)
    self.assertNotEmpty(gold)
    for key, value in gold.items():
      self.assertAlmostEqual(value, 100.0, places=3, msg=f"{benchmark} {key} on gold: {gold}")
    wrong = evaluate(name, examples, lambda targets: ["zebra quartz"] * len(targets))
    self.assertEqual(set(wrong), set(gold))
    for key, value in wrong.items():
      self.assertLess(value, 50.0, msg=f"{benchmark} {key} on wrong answers: {wrong}")


if __name__ == "__main__":
  absltest.main()
