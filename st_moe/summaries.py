"""Router summaries and the training loss in the event files, on the CPU as on a TPU.

The model's scalars (`mtf.scalar_summary`: the router's balance loss, z-loss, fraction dropped,
confidence, entropy and expert fractions of every sparse layer) are lowered into the graph
collection `mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY`, which mesh_tensorflow reads only to build
the TPU host call (`tpu_estimator_model_fn.tpu_summaries`); on the CPU nothing writes them, and the
Estimator writes its own loss only every 100 steps. `install()` (called once by `st_moe.register`)
wraps `mesh_tensorflow.transformer.utils.tpu_estimator_model_fn`, the function `get_estimator`
builds every t5_mesh_transformer model_fn with, so that its model_fn also:

  * CPU/GPU training: writes `loss` and every collected scalar at every step into `model_dir`, with
    TF2 summary ops that run after the step's update and take the global step read after it (the
    first step of a fresh run is step 1; no race with the increment). With a local `model_dir`
    the writer is flushed after every step, so a run killed at any point leaves every finished
    step on disk (a resumed run's curve is complete); a remote one (gs://) flushes every
    `flush_secs`.
  * TPU training: turns on mesh_tensorflow's own host call (`tpu_summaries=True`), which writes
    `loss` and the same scalars, under the same tags, every step. Nothing else changes on a TPU.
  * evaluation (CPU and TPU): adds the mean of every collected scalar over the evaluation batches
    to the evaluation metrics, so `<model_dir>/eval_<name>/` holds e.g.
    `.../SparseFFN/router/fraction_dropped` at evaluation capacity beside `neg_log_perplexity`.

Tags are mtf's operation names: `<layer scope>/router/<metric>`, e.g.
`encoder/block_001/sparse_ffn/SparseFFN/router/z_loss` (`ROUTER_TAG_INFIX`).

This is an explicit patch of one upstream function (mesh_tensorflow 0.1.21 has no other hook that
runs after the train op and sees the loss); `install()` says so in the log, `uninstall()` undoes
it, and `st_moe.event_summaries` (gin) turns each part off:

  --gin_param=st_moe.event_summaries.enabled=False
"""
import contextlib
import functools

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf
import tensorflow.compat.v2 as tf2

ROUTER_TAG_INFIX = "/router/"
LOSS_TAG = "loss"
_ORIGINAL_ATTR = "_st_moe_original_tpu_estimator_model_fn"


@gin.configurable("st_moe.event_summaries")
def settings(enabled=True, train=True, evaluation=True, tpu_host_call=True, flush_secs=None):
  """What the wrapped model_fn writes (read when the model_fn is built, after gin is parsed).

  Args:
    enabled: False leaves mesh_tensorflow's model_fn exactly as upstream builds it.
    train: CPU/GPU training writes `loss` and the collected scalars every step.
    evaluation: evaluation adds the mean of every collected scalar to its metrics.
    tpu_host_call: on a TPU, training turns on `tpu_estimator_model_fn.tpu_summaries` (mtf's
      host call, which writes the same tags).
    flush_secs: how often the CPU writer flushes; None: after every step for a local
      model_dir, every 30 s for a remote one (a flush of a gs:// file uploads it whole).

  Returns:
    a dict of the settings.
  """
  if flush_secs is not None and not flush_secs >= 0:
    raise ValueError(f"st_moe.event_summaries.flush_secs={flush_secs!r}: give seconds >= 0, "
                     "or None (every step locally, 30 s on gs://)")
  return dict(enabled=enabled, train=train, evaluation=evaluation, tpu_host_call=tpu_host_call,
              flush_secs=flush_secs)


def is_remote(path):
  return "://" in str(path)


def in_control_flow(tensor):
  """Whether `tensor` is computed inside a tf.while_loop or tf.cond: mesh_tensorflow's microbatch
  loop (`utils.serialize_num_microbatches` splits a batch of more tokens per replica than its
  `tokens_per_microbatch_per_replica`, 2048 by default) lowers the model inside one, and such a
  tensor cannot be read outside it."""
  return tensor.op._get_control_flow_context() is not None  # pylint: disable=protected-access


_warned_graphs = set()


def _warn_dropped(names):
  graph = tf.get_default_graph()
  if names and id(graph) not in _warned_graphs:
    _warned_graphs.add(id(graph))
    tf.logging.warning(
        "st_moe.summaries: %d router scalars (e.g. %s) are computed inside mesh_tensorflow's "
        "microbatch loop and are not written (the loss is). The batch is split because it has "
        "more tokens per replica than utils.serialize_num_microbatches."
        "tokens_per_microbatch_per_replica; set that to None (or above the batch's tokens per "
        "replica) to get them.", len(names), names[0])


def collected_scalars():
  """[(tag, <float32>[] tf.Tensor)] lowered by `mtf.scalar_summary` in the default graph, except
  those inside a loop (`in_control_flow`, logged once per graph)."""
  found, dropped = [], []
  for name, tensor in tf.get_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY):
    if in_control_flow(tensor):
      dropped.append(name)
    else:
      found.append((name, tf.cast(tensor, tf.float32)))
  _warn_dropped(dropped)
  return found


def drop_loop_scalars():
  """Removes the collected scalars inside a loop from the graph collection (mtf's TPU host call
  reads it and would fail on them); returns their names."""
  collection = tf.get_collection_ref(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY)
  dropped = [name for name, tensor in collection if in_control_flow(tensor)]
  collection[:] = [(n, t) for n, t in collection if not in_control_flow(t)]
  _warn_dropped(dropped)
  return dropped


@contextlib.contextmanager
def _host_call_without_loop_scalars():
  """mesh_tensorflow's TPU host call, built from the collection less its in-loop scalars."""
  original = mtf.utils.create_host_call

  def create_host_call(model_dir):
    drop_loop_scalars()
    return original(model_dir)

  mtf.utils.create_host_call = create_host_call
  try:
    yield
  finally:
    mtf.utils.create_host_call = original


class _WriterHook(tf.train.SessionRunHook):
  """Creates the summary writer in each session and flushes it when training ends."""

  def __init__(self, writer):
    self._writer = writer
    self._init = writer.init()
    self._flush = writer.flush()

  def after_create_session(self, session, coord):
    del coord
    session.run(self._init)

  def end(self, session):
    session.run(self._flush)


def add_train_writes(spec, model_dir, flush_secs=None):
  """`spec` (a training EstimatorSpec) whose train op also writes the step's scalars.

  Args:
    spec: the EstimatorSpec of mesh_tensorflow's CPU training branch.
    model_dir: where the events file goes.
    flush_secs: see `settings`.

  Returns:
    an EstimatorSpec: train_op runs the original update, then writes `loss` and every collected
    scalar at the global step read after the update; a chief hook creates and flushes the writer.
  """
  remote = is_remote(model_dir)
  if flush_secs is None:
    flush_secs = 30.0 if remote else 0.0
  global_step = tf.train.get_global_step()
  with tf.control_dependencies([spec.train_op]):
    step = tf.identity(global_step.read_value() if hasattr(global_step, "read_value")
                       else global_step)
    step = tf.cast(step, tf.int64)
  # flush_secs 0: one explicit flush after each step's writes (the writer's own timer is then
  # only a backstop); else the writer's timer.
  writer = tf2.summary.create_file_writer(
      model_dir, max_queue=1000, flush_millis=int(1000 * (flush_secs or 600)),
      filename_suffix=".st_moe.v2")
  scalars = [(LOSS_TAG, tf.cast(spec.loss, tf.float32))] + collected_scalars()
  with writer.as_default(), tf2.summary.record_if(True):
    with tf.control_dependencies([spec.train_op]):
      writes = [tf2.summary.scalar(tag, value, step=step) for tag, value in scalars]
  ops = list(writes)
  if flush_secs == 0:
    with tf.control_dependencies(writes):
      ops.append(writer.flush())
  train_op = tf.group([spec.train_op] + ops)
  hooks = tuple(spec.training_chief_hooks) + (_WriterHook(writer),)
  return spec._replace(train_op=train_op, training_chief_hooks=hooks)


def add_eval_metrics(spec):
  """`spec` (a TPUEstimatorSpec in EVAL mode) with the mean of every collected scalar as a metric.

  The scalars go through `eval_metrics` as [1] tensors, as TPUEstimatorSpec requires (it
  concatenates them over TPU shards; `tf.metrics.mean` then averages over shards and batches).
  """
  scalars = collected_scalars()
  if not scalars or spec.eval_metrics is None:
    return spec
  metric_fn, tensors = spec.eval_metrics
  if isinstance(tensors, dict):  # mtf passes a list; keep any other form untouched
    return spec
  tensors = list(tensors)
  count = len(tensors)
  names = [name for name, _ in scalars]

  def with_router_means(*args):
    metrics = dict(metric_fn(*args[:count]))
    for name, value in zip(names, args[count:]):
      metrics.setdefault(name, tf.metrics.mean(value))
    return metrics

  extra = [tf.reshape(value, [1]) for _, value in scalars]
  # Through the constructor, not _replace: TPUEstimatorSpec records its host calls (which the CPU
  # path of TPUEstimator runs) in __new__.
  fields = dict(spec._asdict(), eval_metrics=(with_router_means, tensors + extra))
  return type(spec)(**fields)


def wrap_model_fn(model_fn, model_dir, use_tpu, options):
  """The model_fn that adds the writes of `add_train_writes` / `add_eval_metrics`.

  Args:
    model_fn: mesh_tensorflow's model_fn(features, labels, mode, params, config).
    model_dir: the run's model_dir.
    use_tpu: whether the model_fn builds TPU computations.
    options: `settings()`.
  """

  @functools.wraps(model_fn)
  def st_moe_model_fn(features, labels, mode, params=None, config=None):
    if use_tpu and options["tpu_host_call"]:
      with _host_call_without_loop_scalars():
        spec = model_fn(features, labels, mode, params=params, config=config)
    else:
      spec = model_fn(features, labels, mode, params=params, config=config)
    if mode == tf.estimator.ModeKeys.TRAIN and not use_tpu and options["train"]:
      spec = add_train_writes(spec, model_dir, options["flush_secs"])
    elif mode == tf.estimator.ModeKeys.EVAL and options["evaluation"]:
      spec = add_eval_metrics(spec)
    return spec

  return st_moe_model_fn


def model_fn_builder(original):
  """A replacement for `tpu_estimator_model_fn` that calls `original` (gin bindings apply)."""

  @functools.wraps(original)
  def tpu_estimator_model_fn(*args, **kwargs):
    options = settings()
    if not options["enabled"]:
      return original(*args, **kwargs)
    if args or "use_tpu" not in kwargs or not kwargs.get("model_dir"):
      return original(*args, **kwargs)  # not get_estimator's call (all keywords): leave it alone
    use_tpu = bool(kwargs["use_tpu"])  # get_estimator passes the --tpu name, None on the CPU
    model_dir = kwargs["model_dir"]
    if use_tpu:
      if options["tpu_host_call"]:
        kwargs["tpu_summaries"] = True
    else:
      # On the CPU mtf's host call is built and thrown away, and it empties the collection this
      # module reads: keep it off (the loss is written here instead).
      kwargs["tpu_summaries"] = False
    return wrap_model_fn(original(*args, **kwargs), model_dir, use_tpu, options)

  setattr(tpu_estimator_model_fn, _ORIGINAL_ATTR, original)
  return tpu_estimator_model_fn


def install():
  """Replaces `mesh_tensorflow.transformer.utils.tpu_estimator_model_fn` (once per process)."""
  current = mtf_utils.tpu_estimator_model_fn
  if hasattr(current, _ORIGINAL_ATTR):
    return False
  mtf_utils.tpu_estimator_model_fn = model_fn_builder(current)
  tf.logging.info("st_moe.summaries: mesh_tensorflow's tpu_estimator_model_fn also writes loss and "
                  "router summaries to the event files (st_moe.event_summaries.enabled=False "
                  "turns it off)")
  return True


def uninstall():
  """Puts back the upstream function (tests)."""
  current = mtf_utils.tpu_estimator_model_fn
  if hasattr(current, _ORIGINAL_ATTR):
    mtf_utils.tpu_estimator_model_fn = getattr(current, _ORIGINAL_ATTR)
