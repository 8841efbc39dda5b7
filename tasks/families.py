"""Task families of st-moe: every benchmark of the paper, with the vocabulary as a parameter.

A `Benchmark` is the vocabulary-free half of a seqio Task (source, text preprocessors,
postprocessor, metrics, training-set size for mixing rates). `task_kwargs(benchmark, vocabulary)`
adds the vocabulary-dependent half (tokenize, EOS, output features), and `add_tasks` registers the
whole family under one name suffix, so the registered tasks (T5's vocabulary, no suffix) and the
tests' and demo's copies (a local vocabulary, e.g. suffix "_local") share one definition.

Names: `st_moe_<benchmark><suffix>`; mixtures `st_moe_<mixture><suffix>`.
"""
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import seqio
from t5.data import glue_utils
from t5.data import postprocessors as t5_post
from t5.data import preprocessors as t5_pre
from t5.evaluation import metrics as t5_metrics
import tensorflow_datasets as tfds

from st_moe.tasks import corpus
from st_moe.tasks import preprocessors
from st_moe.tasks import pydoc_topic
from st_moe.tasks import sources
from st_moe.tasks import vocab

PREFIX = "st_moe_"
# Splits are listed, not read from TFDS's info, so that an unprepared data set still has splits
# (t5's eval checks `split in task.splits`) and fails with DatasetNotPreparedError when read.
SPLITS = ("train", "validation", "test")
C4_TFDS_NAME = "c4/en:3.1.0"  # the c4/en version this tfds provides (3.0.1 is not listed)
# ST-MoE span corruption (Raffel et al. 2020 objective): mean noise span 3, noise density 0.15.
MEAN_NOISE_SPAN_LENGTH = 3.0
NOISE_DENSITY = 0.15


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """The vocabulary-free definition of one task.

  Attributes:
    name: task name without prefix and suffix, e.g. "super_glue_boolq".
    source: a seqio.DataSource (a PreparedTfdsDataSource for TFDS data).
    text_preprocessors: preprocessors run before tokenization; they produce "inputs"/"targets".
    token_preprocessors: preprocessors run after tokenization and caching (span corruption).
    postprocess_fn: maps decoded text (and, for targets, the example) to the metric's input.
    metric_fns: `(targets, predictions) -> dict` functions.
    train_examples: training-set size (TFDS catalog), the mixing rate "by examples".
    metric_note: the reported metric, for the README table.
    paper_32b: ST-MoE-32B's number in the paper (ST_MOE_FACTS.md), "" where not given.
    own_vocabulary: returns the task's own vocabulary, used in the registered family (no
      vocabulary given to `add_tasks`); None: the family's vocabulary.
    source_note: what an embedded source holds, for the README table.
  """
  name: str
  source: seqio.DataSource
  text_preprocessors: Sequence[Callable]
  token_preprocessors: Sequence[Callable] = ()
  postprocess_fn: Optional[Callable] = None
  metric_fns: Sequence[Callable] = ()
  train_examples: int = 0
  metric_note: str = ""
  paper_32b: str = ""
  own_vocabulary: Optional[Callable[[], seqio.Vocabulary]] = None
  source_note: str = ""

  @property
  def tfds_name(self) -> str:
    if isinstance(self.source, seqio.TfdsDataSource):
      return self.source.tfds_dataset.name
    return self.source_note or "(embedded: pydoc_data.topics)"


def _span_corruption_preprocessors():
  text = [functools.partial(t5_pre.rekey, key_map={"inputs": None, "targets": "text"})]
  tokens = [functools.partial(t5_pre.span_corruption,
                              mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH,
                              noise_density=NOISE_DENSITY)]
  return text, tokens


def _super_glue(name: str, train_examples: int, paper_32b: str, metric_note: str) -> Benchmark:
  config_name = "wsc.fixed" if name == "wsc" else name
  config = tfds.text.super_glue.SuperGlue.builder_configs[config_name]
  if name == "wsc":
    # The classification form (span-marked text -> True/False), accuracy: one task for all splits.
    metric_fns = [t5_metrics.accuracy]
  else:
    metric_fns = glue_utils.get_super_glue_metric(name)
  return Benchmark(
      name=f"super_glue_{name}",
      source=sources.PreparedTfdsDataSource(f"super_glue/{config_name}:1.0.2", splits=SPLITS),
      text_preprocessors=[glue_utils.get_glue_text_preprocessor(config)],
      postprocess_fn=glue_utils.get_glue_postprocess_fn(config),
      metric_fns=metric_fns, train_examples=train_examples, metric_note=metric_note,
      paper_32b=paper_32b)


def _summarization(name, tfds_name, article_key, summary_key, train_examples, paper_32b):
  return Benchmark(
      name=name, source=sources.PreparedTfdsDataSource(tfds_name, splits=SPLITS),
      text_preprocessors=[functools.partial(t5_pre.summarize, article_key=article_key,
                                            summary_key=summary_key)],
      metric_fns=[t5_metrics.rouge], train_examples=train_examples,
      metric_note="ROUGE-1/2/Lsum", paper_32b=paper_32b)


def _closed_book(name, tfds_name, prefix, answers_key, train_examples, metric_fn,
                 target_key="", splits=SPLITS):
  return Benchmark(
      name=name, source=sources.PreparedTfdsDataSource(tfds_name, splits=splits),
      text_preprocessors=[functools.partial(preprocessors.closed_book_qa, benchmark=prefix,
                                            answers_key=answers_key, target_key=target_key)],
      postprocess_fn=t5_post.qa, metric_fns=[metric_fn], train_examples=train_examples,
      metric_note="exact match (+F1), normalised, max over gold answers")


ANLI_LABELS = ("entailment", "neutral", "contradiction")


def benchmarks() -> list[Benchmark]:
  """Every downstream benchmark of the paper, in README order."""
  arc_pp = [preprocessors.arc]
  return [
      _super_glue("boolq", 9_427, "92.4", "accuracy"),
      _super_glue("cb", 250, "", "F1 (mean over classes), accuracy"),
      _super_glue("copa", 400, "99.2", "accuracy"),
      _super_glue("multirc", 27_243, "89.6 (F1a)", "F1a over answers, EM over questions"),
      _super_glue("record", 138_854, "95.1 (EM)", "EM, F1 (max over answers)"),
      _super_glue("rte", 2_490, "", "accuracy"),
      _super_glue("wic", 5_428, "", "accuracy"),
      _super_glue("wsc", 554, "", "accuracy"),
      Benchmark(name="arc_easy",
                source=sources.PreparedTfdsDataSource("ai2_arc/ARC-Easy:1.0.0", splits=SPLITS),
                text_preprocessors=arc_pp, metric_fns=[t5_metrics.accuracy],
                train_examples=2_251, metric_note="accuracy", paper_32b="95.2"),
      Benchmark(name="arc_challenge",
                source=sources.PreparedTfdsDataSource("ai2_arc/ARC-Challenge:1.0.0",
                                                      splits=SPLITS),
                text_preprocessors=arc_pp, metric_fns=[t5_metrics.accuracy],
                train_examples=1_119, metric_note="accuracy", paper_32b="86.5"),
      Benchmark(name="winogrande",
                source=sources.PreparedTfdsDataSource(
                    "winogrande:1.2.0",
                    splits={"train": "train_xl", "validation": "validation", "test": "test"}),
                text_preprocessors=[preprocessors.winogrande], metric_fns=[t5_metrics.accuracy],
                train_examples=40_398, metric_note="accuracy (XL training set)",
                paper_32b="96.1"),
      Benchmark(name="anli_r3",
                source=sources.PreparedTfdsDataSource("anli/r3:0.1.0", splits=SPLITS),
                text_preprocessors=[functools.partial(
                    t5_pre.glue, benchmark_name="anli", label_names=ANLI_LABELS,
                    feature_names=("context", "hypothesis"), id_key=None)],
                postprocess_fn=functools.partial(t5_post.string_label_to_class_id,
                                                 label_classes=ANLI_LABELS),
                metric_fns=[t5_metrics.accuracy], train_examples=100_459,
                metric_note="accuracy", paper_32b="(SOTA claimed)"),
      _summarization("xsum", "xsum:1.1.0", "document", "summary", 204_045, "27.1 (ROUGE-2)"),
      _summarization("cnn_dailymail", "cnn_dailymail:3.4.0", "article", "highlights", 287_113,
                     "~20.7-21.7 (ROUGE-2)"),
      _closed_book("web_questions", "web_questions:1.0.0", "web_questions", "answers", 3_778,
                   t5_metrics.squad, splits=("train", "test")),
      _closed_book("natural_questions_open", "natural_questions_open:1.0.0", "nq", "answer",
                   87_925, t5_metrics.squad, splits=("train", "validation")),
      _closed_book("trivia_qa", "trivia_qa/unfiltered.nocontext:1.1.0", "trivia_qa",
                   "answer/aliases", 87_622, t5_metrics.trivia_qa, target_key="answer/value"),
  ]


def pretraining_benchmarks() -> list[Benchmark]:
  """C4 span corruption (the paper's pretraining data) and the embedded demo corpus."""
  text, tokens = _span_corruption_preprocessors()
  return [
      Benchmark(name="c4_span_corruption", source=sources.PreparedTfdsDataSource(
                    C4_TFDS_NAME, splits=("train", "validation")),
                text_preprocessors=text, token_preprocessors=tokens,
                metric_note="(pretraining: none)"),
      Benchmark(name="embedded_span_corruption", source=sources.embedded_source(),
                text_preprocessors=text, token_preprocessors=tokens,
                metric_note="(pretraining: none)"),
      # The docs corpus (tasks/corpus.py, 12.4 MB) with its own 8k vocabulary: --scale=small.
      Benchmark(name="embedded_docs_span_corruption", source=corpus.docs_source(),
                text_preprocessors=text, token_preprocessors=tokens,
                metric_note="(pretraining: none)", own_vocabulary=corpus.docs_vocabulary,
                source_note="(embedded: docs corpus, tasks/data/docs_corpus.jsonl.xz)"),
  ]


def embedded_benchmarks() -> list[Benchmark]:
  """Downstream tasks over embedded text (no download; the embedded vocabulary): the demo's."""
  return [
      Benchmark(name=pydoc_topic.NAME, source=pydoc_topic.source(),
                text_preprocessors=[pydoc_topic.to_text], metric_fns=[t5_metrics.accuracy],
                train_examples=len(pydoc_topic.examples("train")),
                metric_note=f"accuracy (constant baseline {pydoc_topic.MAJORITY_ACCURACY:.1f})"),
      # The same examples in the docs corpus's 8k vocabulary: fine-tuning at --scale=small, whose
      # models pretrain on the docs corpus (tools/reproduce.py's finetune_* tables).
      Benchmark(name=pydoc_topic.DOCS_NAME, source=pydoc_topic.source(),
                text_preprocessors=[pydoc_topic.to_text], metric_fns=[t5_metrics.accuracy],
                train_examples=len(pydoc_topic.examples("train")),
                metric_note=f"accuracy (constant baseline {pydoc_topic.MAJORITY_ACCURACY:.1f})",
                own_vocabulary=corpus.docs_vocabulary),
  ]


def all_benchmarks() -> list[Benchmark]:
  return pretraining_benchmarks() + benchmarks() + embedded_benchmarks()


def task_name(benchmark: str, suffix: str = "") -> str:
  return f"{PREFIX}{benchmark}{suffix}"


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """T5's encoder-decoder features: "inputs" and "targets", EOS appended to both."""
  return {"inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True)}


def task_kwargs(benchmark: Benchmark, vocabulary: seqio.Vocabulary) -> dict:
  """The keyword arguments of `seqio.TaskRegistry.add` for `benchmark` with `vocabulary`."""
  return dict(
      source=benchmark.source,
      preprocessors=[*benchmark.text_preprocessors,
                     seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(),
                     *benchmark.token_preprocessors,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=output_features(vocabulary),
      postprocess_fn=benchmark.postprocess_fn,
      metric_fns=list(benchmark.metric_fns))


def add_tasks(vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = "",
              embedded_vocabulary: Optional[seqio.Vocabulary] = None) -> list[str]:
  """Registers every task family with `vocabulary`; names already registered are kept as they are.

  Args:
    vocabulary: the vocabulary of the C4 and downstream tasks; None means T5's default.
    suffix: appended to every task name (the registered family has none).
    embedded_vocabulary: the vocabulary of the embedded tasks (names starting "embedded_"); None
      means `vocab.embedded_vocabulary()` when `vocabulary` is None, else `vocabulary`. When
      `vocabulary` is None, a benchmark with an `own_vocabulary` (the docs corpus) uses that.

  Returns:
    the names of all the family's tasks, registered now or before.
  """
  own_vocabularies = vocabulary is None  # the registered family: tasks use their own vocabulary
  if vocabulary is None:
    vocabulary = vocab.default_vocabulary()
    embedded_vocabulary = embedded_vocabulary or vocab.embedded_vocabulary()
  embedded_vocabulary = embedded_vocabulary or vocabulary
  names = []
  for b in all_benchmarks():
    name = task_name(b.name, suffix)
    names.append(name)
    if name in seqio.TaskRegistry.names():
      continue
    v = embedded_vocabulary if b.name.startswith("embedded_") else vocabulary
    if own_vocabularies and b.own_vocabulary is not None:
      v = b.own_vocabulary()
    seqio.TaskRegistry.add(name, **task_kwargs(b, v))
  return names


SUPER_GLUE = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")


def mixtures(suffix: str = "") -> dict[str, list[tuple[str, float]]]:
  """Mixture name -> [(task name, rate)]: rates are training-set sizes ("by examples", as T5)."""
  by_name = {b.name: b for b in benchmarks()}
  rated = lambda names: [(task_name(n, suffix), float(by_name[n].train_examples)) for n in names]
  return {
      # ST-MoE pretrained on C4 plus a dialogue corpus that TFDS does not provide: C4 alone here.
      task_name("pretrain", suffix): [(task_name("c4_span_corruption", suffix), 1.0)],
      task_name("super_glue", suffix): rated([f"super_glue_{n}" for n in SUPER_GLUE]),
      task_name("finetune", suffix): rated(list(by_name)),
  }


def add_mixtures(suffix: str = "") -> list[str]:
  """Registers the mixtures over the tasks `add_tasks(..., suffix)` registered."""
  names = []
  for name, tasks in mixtures(suffix).items():
    names.append(name)
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, tasks)
  return names


def remove(names: Sequence[str]) -> None:
  """Removes tasks or mixtures from seqio's global registries (tests and tools clean up)."""
  for name in names:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
