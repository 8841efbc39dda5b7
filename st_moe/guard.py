"""Guards: an in-graph check that keeps non-finite steps out of the weights, and pre-flight checks.

`st_moe.GuardedOptimizer` wraps a mesh_tensorflow optimizer (Adafactor in our run files):

  utils.run.optimizer = @st_moe.GuardedOptimizer
  st_moe.GuardedOptimizer.optimizer = @optimize.AdafactorOptimizer
  st_moe.GuardedOptimizer.max_consecutive_skips = 10

In every training step, inside the graph (so on TPU as on CPU), it checks that every gradient and
every value the wrapped optimizer is about to write (weights' updates and optimizer slots) is finite.
If one is not, no variable and no optimizer slot changes: every assignment of the step writes the
old value back (`tf.where`, bit-exact), the step is counted in `st_moe_guard/skipped_steps` and
`st_moe_guard/consecutive_skipped` (scalar summaries), and the global step still advances.
`max_consecutive_skips` (K) skipped steps in a row stop the run with an error that names the step,
its loss, and the first variable whose gradient (or update) is not finite; K = 0 never stops.

Stopping, by device:
  * CPU (and any mesh_tensorflow PlacementMeshImpl): a `tf.debugging.Assert` in the train op;
    `session.run` raises `tf.errors.InvalidArgumentError` whose message starts with
    `STOP_MESSAGE_PREFIX`, and t5_mesh_transformer exits non-zero. Tested (tests/guard_test.py).
  * TPU (SimdMeshImpl): an Assert is not allowed inside a TPU computation, so the check formats and
    asserts on the host through `tf.tpu.outside_compilation`, inside a `tf.cond` that only enters
    when K is reached (no host round trip on ordinary steps). Not run here (no TPU); if outside
    compilation is unavailable in a setup, the skipping still works on the TPU and the counters
    reach the event files with `utils.run.tpu_summaries = True` (mtf's host call), where the
    runner's divergence rule can read `st_moe_guard/consecutive_skipped`.

The counters are local variables (not in checkpoints): they count since the process started, and
checkpoints with and without the guard are interchangeable (no missing-key errors on resume).

Pre-flight checks (`preflight`, a gin finalize hook that st_moe.register installs): after
t5_mesh_transformer has parsed the gin files and before any graph is built, a batch size the mesh
does not divide and an unreadable latest checkpoint in --model_dir are named with what to change.
"""
from typing import List, Optional, Sequence, Tuple

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow import optimize
import tensorflow.compat.v1 as tf

STOP_MESSAGE_PREFIX = "st_moe.GuardedOptimizer stopped the run"
SUMMARY_PREFIX = "st_moe_guard"
SKIPPED_SUMMARY = SUMMARY_PREFIX + "/skipped_steps"
CONSECUTIVE_SUMMARY = SUMMARY_PREFIX + "/consecutive_skipped"
_NONE_NAME = "none (all finite)"


def _probe(x: mtf.Tensor) -> mtf.Tensor:
  """<float32>[] the sum of `x`: finite iff every element is (inf or NaN propagates through a sum).

  One read of `x` and no temporary, the cheapest whole-tensor test; a sum that overflows
  float32 (elements around 1e34 and more) also reads as non-finite, and that step is skipped too.
  (Not `reduce_sum(x * 0)`, NaN iff one is: TensorFlow's graph optimizer rewrote that product so
  that an inf in an einsum's output no longer showed; tests/guard_test.py has the case.)
  """
  return mtf.reduce_sum(mtf.cast(x, tf.float32))


def _where(ok: mtf.Tensor, if_ok: mtf.Tensor, if_not: mtf.Tensor) -> mtf.Tensor:
  """Element-wise select on a scalar condition; unlike mtf.where (a sum of products), a NaN or inf
  in the branch not taken does not leak into the result.

  Args:
    ok: <bool>[] replicated scalar.
    if_ok: a tensor of shape S.
    if_not: a tensor of shape S (cast to if_ok's dtype).

  Returns:
    a tensor of shape S and if_ok's dtype.
  """
  def select(c, a, b):
    return tf.where_v2(c, a, tf.cast(b, a.dtype))
  return mtf.slicewise(select, [ok, if_ok, if_not], output_shape=if_ok.shape,
                       output_dtype=if_ok.dtype, splittable_dims=if_ok.shape.dims,
                       name="st_moe_guard_select")


def _gated_value(ok: mtf.Tensor, variable: mtf.Variable, value: mtf.Tensor,
                 assign_fn) -> mtf.Tensor:
  """What an assignment writes when the step may be skipped: `value` if ok, else a no-op value."""
  if assign_fn is mtf.assign_slice:
    return _where(ok, value, variable.outputs[0])  # write the old value back
  if assign_fn in (mtf.assign_add_slice, mtf.assign_sub_slice):  # add or subtract 0 instead
    def select(c, a):
      return tf.where_v2(c, a, tf.zeros([], a.dtype))  # a scalar 0, broadcast: no zeros tensor
    return mtf.slicewise(select, [ok, value], output_shape=value.shape, output_dtype=value.dtype,
                         splittable_dims=value.shape.dims, name="st_moe_guard_select")
  raise ValueError(
      f"st_moe.GuardedOptimizer: the wrapped optimizer assigns {variable.name} with "
      f"{getattr(assign_fn, '__name__', assign_fn)}; only mtf.assign, mtf.assign_add and "
      "mtf.assign_sub can be skipped. Use an optimizer built from those (Adafactor, SGD, "
      "momentum, Adam) or bind utils.run.optimizer to the optimizer itself (no guard).")


def find_loss(graph: mtf.Graph) -> Optional[mtf.Tensor]:
  """The training loss of `graph`: the scalar that mtf.gradients started from, None if not found.

  mtf.gradients creates `Constant(1.0)` of the loss's shape and dtype right after the loss, then
  the gradient ops (named `<op>/gradients/...`). utils.run computes the loss and calls
  mtf.gradients next, so the op before that constant produced the loss. With microbatches
  (mtf.serialize_training_step) the structure differs and None is returned.

  Args:
    graph: the mtf.Graph of a training step, after mtf.gradients.

  Returns:
    <float>[] the loss, or None.
  """
  ops = graph.operations
  first_grad = next((i for i, op in enumerate(ops) if "/gradients/" in op.name), None)
  if first_grad is None:
    return None
  for i in range(first_grad - 1, 0, -1):
    op = ops[i]
    if isinstance(op, mtf.Constant) and not op.outputs[0].shape.dims:
      if getattr(op, "_value", None) != 1.0:
        continue
      previous = ops[i - 1].outputs
      if (len(previous) == 1 and not previous[0].shape.dims
          and previous[0].dtype == op.outputs[0].dtype and previous[0].dtype.is_floating):
        return previous[0]
      return None
  return None


class _GuardCheck(mtf.Operation):
  """Lowers to the stop of the guard (a no-op below K consecutive skips); no outputs."""

  def __init__(self, consecutive, skipped, loss, grad_probes, update_probes, grad_names,
               update_names, max_consecutive_skips):
    inputs = [consecutive, skipped] + ([loss] if loss is not None else [])
    super().__init__(inputs + list(grad_probes) + list(update_probes), consecutive.mesh,
                     name="st_moe_guard_check")
    self._has_loss = loss is not None
    self._num_grads = len(grad_probes)
    self._grad_names = list(grad_names) + [_NONE_NAME]
    self._update_names = list(update_names) + [_NONE_NAME]
    self._max = max_consecutive_skips
    self._outputs = []

  def lower(self, lowering):
    def first_slice(t):  # replicated scalars: every slice holds the value
      return lowering.tensors[t].to_laid_out_tensor().tensor_list[0]
    values = [first_slice(t) for t in self.inputs]
    consecutive = values[0]
    loss = values[2] if self._has_loss else tf.constant(float("nan"))
    probes = values[3 if self._has_loss else 2:]
    grad_probes, update_probes = probes[:self._num_grads], probes[self._num_grads:]
    on_tpu = isinstance(lowering.mesh_impl(self), mtf.simd_mesh_impl.SimdMeshImpl)
    ops = [tf.no_op()]
    if self._max:
      step = tf.train.get_global_step()
      step = tf.constant(-1, tf.int64) if step is None else tf.cast(step, tf.int64)
      grad_names, update_names = self._grad_names, self._update_names
      max_skips = self._max

      def stop(consecutive, step, loss, *probes):
        """Fails the step with the message (CPU: in the graph; TPU: on the host, where the
        strings are made: no string tensor enters the TPU computation)."""
        names = (tf.constant(grad_names), tf.constant(update_names))
        def first_nonfinite(ps, names):
          if not ps:
            return names[-1]
          bad = tf.logical_not(tf.math.is_finite(tf.stack(ps)))
          index = tf.where_v2(tf.reduce_any(bad), tf.argmax(tf.cast(bad, tf.int32)),
                              tf.constant(len(ps), tf.int64))
          return tf.gather(names, index)
        grad_name = first_nonfinite(list(probes[:self._num_grads]), names[0])
        update_name = first_nonfinite(list(probes[self._num_grads:]), names[1])
        message = tf.strings.join([
            STOP_MESSAGE_PREFIX + ": ", tf.strings.as_string(consecutive),
            " consecutive training steps had a non-finite gradient or update and were skipped "
            f"(st_moe.GuardedOptimizer.max_consecutive_skips = {max_skips}). Last skipped: "
            "global step ", tf.strings.as_string(step),
            " (or the one after: mesh_tensorflow increments it unordered with this read)",
            ", loss ", tf.strings.as_string(loss, shortest=True),
            "; first variable with a non-finite gradient: ", grad_name,
            "; first variable with a non-finite update: ", update_name,
            ". The weights and optimizer state are those before the first skipped step (every "
            "checkpoint written since is intact). Lower the learning rate or resume from an "
            "earlier checkpoint (utils.run.init_checkpoint); "
            "st_moe.GuardedOptimizer.max_consecutive_skips = 0 only skips and never stops."])
        return tf.debugging.Assert(tf.constant(False), [message], summarize=1)

      def stop_op():
        if on_tpu:
          tf.tpu.outside_compilation(stop, consecutive, step, loss, *grad_probes,
                                     *update_probes)
        else:
          with tf.control_dependencies(
              [stop(consecutive, step, loss, *grad_probes, *update_probes)]):
            return tf.no_op()
        return tf.no_op()
      ops.append(tf.cond(consecutive < max_skips, tf.no_op, stop_op))
    lowering.operations[self] = tf.group(ops)

  @property
  def has_gradient(self):
    return False


def _remove_operations(graph: mtf.Graph, operations: Sequence[mtf.Operation]):
  """Drops the wrapped optimizer's own (ungated) Assign ops from the graph.

  Left in, they would be lowered (never run) and would stop autostacking: mtf stacks only
  variables with the same set of Assign ops. mtf's own Graph.combine_assignments removes
  assignments the same way (it rewrites the graph's operation list).
  """
  drop = set(operations)
  graph._operations = [op for op in graph.operations if op not in drop]  # pylint: disable=protected-access


@gin.configurable(module="st_moe")
class GuardedOptimizer(optimize.Optimizer):
  """A mesh_tensorflow optimizer that skips (and counts) steps with a non-finite gradient or update.

  See the module docstring. utils.run constructs it as `optimizer(learning_rate=...)`.
  """

  def __init__(self, learning_rate=None, optimizer=optimize.AdafactorOptimizer,
               max_consecutive_skips: int = 10):
    """Initializes the guard and the wrapped optimizer.

    Args:
      learning_rate: passed to `optimizer` (utils.run passes its schedule's value).
      optimizer: a mesh_tensorflow optimizer class (or gin configurable), called as
        `optimizer(learning_rate=learning_rate)`.
      max_consecutive_skips: K >= 0; K skipped steps in a row stop the run; 0 never stops.
    """
    if (not isinstance(max_consecutive_skips, int) or isinstance(max_consecutive_skips, bool)
        or max_consecutive_skips < 0):
      raise ValueError(
          f"st_moe.GuardedOptimizer.max_consecutive_skips = {max_consecutive_skips!r}: must be an "
          "integer >= 0 (the number of skipped steps in a row that stop the run; 0: never stop).")
    if not callable(optimizer):
      raise ValueError(f"st_moe.GuardedOptimizer.optimizer = {optimizer!r}: must be a "
                       "mesh_tensorflow optimizer class, e.g. @optimize.AdafactorOptimizer.")
    self._optimizer = optimizer(learning_rate=learning_rate)
    self._max_consecutive_skips = max_consecutive_skips

  @property
  def optimizer(self) -> optimize.Optimizer:
    """The wrapped optimizer."""
    return self._optimizer

  def apply_grad(self, grad, var):
    raise NotImplementedError("st_moe.GuardedOptimizer checks all gradients together: call "
                              "apply_grads (utils.run does).")

  def apply_grads(self, grads: Sequence[Optional[mtf.Tensor]],
                  variables: Sequence[mtf.Variable]) -> List[mtf.Operation]:
    """The wrapped optimizer's updates, each skipped when any gradient or update is non-finite.

    Args:
      grads: one gradient (or None) per variable.
      variables: the trainable mtf.Variables.

    Returns:
      the mtf.Operations of the step: the gated assignments (combined), the counters' updates,
      and the check (summaries and stop).
    """
    assignments = []
    for grad, var in zip(grads, variables):
      assignments.extend(self._optimizer.apply_grad(grad, var))
    if not assignments:
      return []
    graph, mesh = variables[0].graph, variables[0].mesh
    loss = find_loss(graph)
    with tf.variable_scope(SUMMARY_PREFIX):
      checked = [(v.name, g) for g, v in zip(grads, variables) if g is not None]
      grad_probes = [_probe(g) for _, g in checked]
      updates = [(var.name, value) for a in assignments
                 for var, value in zip(a.variables, a.inputs)]
      update_probes = [_probe(value) for _, value in updates]
      total = mtf.add_n(grad_probes + update_probes)
      ok = mtf.cwise(tf.math.is_finite, [total], output_dtype=tf.bool, name="ok")
      gated = [mtf.Assign(a.variables,
                          [_gated_value(ok, var, value, a.assign_fn)
                           for var, value in zip(a.variables, a.inputs)],
                          a.assign_fn)
               for a in assignments]
      _remove_operations(graph, assignments)
      counters = []
      with tf.variable_scope("counters"):  # not "st_moe_guard/skipped_steps": the summaries' tags
        for name in ("skipped_steps", "consecutive_skipped"):
          counters.append(mtf.get_variable(
              mesh, name, mtf.Shape([]), dtype=tf.int32, initializer=tf.zeros_initializer(),
              trainable=False, collections=[tf.GraphKeys.LOCAL_VARIABLES]))
      skip = mtf.cast(mtf.logical_not(ok), tf.int32)
      skipped = counters[0] + skip
      consecutive = (counters[1] + 1) * skip
      mtf.scalar_summary(SKIPPED_SUMMARY.split("/")[-1], skipped)  # tags SKIPPED_SUMMARY and
      mtf.scalar_summary(CONSECUTIVE_SUMMARY.split("/")[-1], consecutive)  # CONSECUTIVE_SUMMARY
      counter_ops = [mtf.assign(counters[0], skipped), mtf.assign(counters[1], consecutive)]
      check = _GuardCheck(consecutive, skipped, loss, grad_probes, update_probes,
                          [n for n, _ in checked], [n for n, _ in updates],
                          self._max_consecutive_skips)
    return graph.combine_assignments(gated) + counter_ops + [check]


# ---- Pre-flight checks: after gin is parsed, before any graph is built. ----

_PER_BATCH = ("sequences_per_batch", "tokens_per_batch")


def batch_size_problem(batch_size, sequence_length, mesh_shape, layout_rules) -> Optional[str]:
  """Why `utils.run.batch_size` cannot work on this mesh, or None.

  Args:
    batch_size: utils.run.batch_size, (method, value), e.g. ("tokens_per_batch", 1048576).
    sequence_length: {"inputs": Li, "targets": Lt} (or an int); None: not checked.
    mesh_shape: utils.run.mesh_shape, e.g. "batch:32".
    layout_rules: utils.run.layout_rules, e.g. "batch:batch,experts:batch".

  Returns:
    None, or the error text: the setting, its value, the mesh dimension and the nearest sizes
    that work.
  """
  from mesh_tensorflow.transformer import utils as mtf_utils  # pylint: disable=g-import-not-at-top
  method, value = batch_size
  mesh_text, layout_text = mesh_shape, layout_rules
  mesh_shape = mtf.convert_to_shape(mesh_shape)
  layout_rules = mtf.convert_to_layout_rules(layout_rules)
  lengths = sequence_length if isinstance(sequence_length, dict) else {"": sequence_length}
  length = max(lengths.values())
  setting = f"utils.run.batch_size = {(method, value)!r}"
  if method.startswith("tokens_") and value % length:
    lo = value // length * length
    nearest = [v for v in (lo, lo + length) if v > 0]
    return (f"{setting}: {value} tokens is not a whole number of sequences of the longest "
            f"sequence length {length} (utils.run.sequence_length = {sequence_length!r}). "
            "Nearest working sizes: " + " or ".join(repr((method, v)) for v in nearest) + ".")
  sequences = mtf_utils.compute_batch_size(lengths, mesh_shape, layout_rules, batch_size)
  axis = layout_rules.tensor_dimension_to_mesh_axis(mtf.Dimension("batch", sequences), mesh_shape)
  if axis is None:
    return None
  mesh_dim = mesh_shape.dims[axis]
  if sequences % mesh_dim.size == 0:
    return None
  unit = length if method.startswith("tokens_") else 1
  lo = sequences // mesh_dim.size * mesh_dim.size
  candidates = [s for s in (lo, lo + mesh_dim.size) if s > 0]
  if method in _PER_BATCH:
    nearest = [(method, s * unit) for s in candidates]
  else:  # per replica: never reached (the replicas are the mesh dimension), kept for safety
    nearest = [("sequences_per_batch", s) for s in candidates]
  return (f"{setting} gives {sequences} sequences per batch, which the mesh dimension "
          f"'{mesh_dim.name}' of size {mesh_dim.size} does not divide (the batch is split over it: "
          f"utils.run.mesh_shape = {mesh_text!r}, utils.run.layout_rules = {layout_text!r}). "
          "Nearest working sizes: " + " or ".join(repr(n) for n in nearest)
          + (", or a per-replica size such as ('sequences_per_replica', "
             f"{max(1, sequences // mesh_dim.size)})" if method in _PER_BATCH else "") + ".")


def _query(name, default=None):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _plain(value) -> bool:
  """Whether a queried gin value is a literal (not a reference or a macro still to evaluate)."""
  if isinstance(value, gin.config.ConfigurableReference) or "Reference" in type(value).__name__:
    return False
  if isinstance(value, dict):
    return all(_plain(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return all(_plain(v) for v in value)
  return True


def check_batch_size():
  """Raises ValueError if utils.run's batch size (as bound in gin) does not fit utils.run's mesh."""
  batch_size = _query("utils.run.batch_size", ("tokens_per_replica", 2048))
  sequence_length = _query("utils.run.sequence_length")
  mesh_shape = _query("utils.run.mesh_shape")
  layout_rules = _query("utils.run.layout_rules")
  values = (batch_size, sequence_length, mesh_shape, layout_rules)
  if any(v is None for v in values) or not all(_plain(v) for v in values):
    return
  if not (isinstance(batch_size, (tuple, list)) and len(batch_size) == 2
          and isinstance(batch_size[1], int)):
    return
  problem = batch_size_problem(tuple(batch_size), sequence_length, mesh_shape, layout_rules)
  if problem:
    raise ValueError(problem)


def _flag(name):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if name not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return None
  return getattr(flags.FLAGS, name)


def check_model_dir():
  """Raises checkpoints.UnreadableCheckpointError if --model_dir's latest checkpoint is unreadable."""
  model_dir = _flag("model_dir")
  if not model_dir:
    return
  from st_moe.experiments import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.check_latest(model_dir)


def preflight(config):
  """The gin finalize hook: `check_batch_size` and `check_model_dir` (t5_mesh_transformer calls
  gin.finalize() after parsing the gin files and binding the vocabulary, before utils.run).

  Only runs when gin binds something of utils.run (e.g. not in unit tests that finalize their
  own configs). Returns no new bindings.
  """
  if not any(selector.endswith("utils.run") or selector == "run" for _, selector in config):
    return None
  check_batch_size()
  check_model_dir()
  return None


def install_preflight() -> bool:
  """Registers `preflight` as a gin finalize hook, once per process (st_moe.register calls it).

  Returns:
    whether it was registered now (False: it already was).
  """
  hooks = gin.config._FINALIZE_HOOKS  # pylint: disable=protected-access
  if any(getattr(h, "__qualname__", None) == preflight.__qualname__
         and getattr(h, "__module__", None) == __name__ for h in hooks):
    return False
  gin.config.register_finalize_hook(preflight)
  return True
