"""What makes two CPU runs of one seed the same run: seeded random ops, an ordered global step.

Two trainings of one seed parted after a few steps (docs/reproduction/README.md, "Seeds and
reruns"), by more than the effects the tables measure. Two upstream causes, both fixed here for
mesh_tensorflow's placement mesh (the CPU's; a TPU's SIMD mesh is left as upstream builds it):

  * **Random ops** (the router's random second-expert policy, dropout, expert dropout, router
    jitter): `PlacementMeshImpl.random` seeds each op with `hash("%s,%s" % (random.random(),
    slice_begin))`: Python's unseeded `random` and a string hash that PYTHONHASHSEED changes in
    every process. `seeded_random` replaces the op seed by a CRC-32 of the op's index among the
    graph's random ops (lowering visits them in creation order) and of the slice's begin, so
    slices that should agree still do, and with the graph seed (`st_moe.seeded_train_dataset_fn`
    sets it) every process draws the same numbers.
  * **The global step** (`order_step_reads`): mesh_tensorflow's training step
    (`mesh_tensorflow/transformer/utils.py`, `tpu_estimator_model_fn`) is
    `tf.group(<every variable's update>, tf.assign_add(global_step, 1))`, with no order between
    the increment and the ops of the same step that read the step: Adafactor's second-moment
    decay rate (`1 - (step + 1)^-0.8`), its default learning rate, the learning-rate schedule.
    The increment is given a control input from every read of the step that does not itself come
    after it, so step n reads n, as upstream's code means.

`install()` (from `st_moe.register`) patches both; gin turns each off:
  --gin_param=st_moe.determinism.seeded_random_ops=False
  --gin_param=st_moe.determinism.ordered_step_reads=False
"""
import functools
import zlib

import gin
from mesh_tensorflow import placement_mesh_impl
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf

_ORIGINAL_ATTR = "_st_moe_determinism_original"
_COUNT_ATTR = "_st_moe_random_ops"
_READS = ("ReadVariableOp",)
_INCREMENTS = ("AssignAddVariableOp",)
_UPSTREAM_RANDOM = placement_mesh_impl.PlacementMeshImpl.random


@gin.configurable("st_moe.determinism")
def settings(seeded_random_ops=True, ordered_step_reads=True):
  """Which of the two fixes apply (read when a graph is built, after gin is parsed)."""
  return dict(seeded_random_ops=seeded_random_ops, ordered_step_reads=ordered_step_reads)


def op_seed(index, slice_begin):
  """The TF op seed of a placement mesh's `index`-th random op on the slice at `slice_begin`."""
  return zlib.crc32(f"st_moe.random_op:{index}:{list(slice_begin)}".encode()) & 0x7FFFFFFF


def seeded_random(mesh_impl, shape, tf_fn, kwargs):
  """`PlacementMeshImpl.random` with seeds that are the same in every process (see the module)."""
  if not settings()["seeded_random_ops"]:
    return _UPSTREAM_RANDOM(mesh_impl, shape, tf_fn, kwargs)
  graph = tf.get_default_graph()
  counts = getattr(graph, _COUNT_ATTR, 0)
  setattr(graph, _COUNT_ATTR, counts + 1)
  slice_shape = mesh_impl.slice_shape(shape)

  def one_slice(pnum):
    return tf_fn(slice_shape, seed=op_seed(counts, mesh_impl.slice_begin(shape, pnum)), **kwargs)

  return mesh_impl.slicewise(one_slice, mesh_impl.laid_out_pnum())


def _after(ops):
  """Every op that runs after one of `ops` (data or control edges), `ops` included."""
  seen, todo = set(), list(ops)
  while todo:
    op = todo.pop()
    if op in seen:
      continue
    seen.add(op)
    todo.extend(c for t in op.outputs for c in t.consumers())
    todo.extend(op._control_outputs)  # pylint: disable=protected-access
  return seen


def order_step_reads(graph=None):
  """Makes the global step's increment wait for every read of the step not downstream of it.

  Returns the number of reads ordered (0 when the graph has no resource global step, e.g. under
  ST_MOE_REF_VARIABLES=1, or no increment of it).
  """
  graph = graph or tf.get_default_graph()
  step = tf.train.get_global_step(graph)
  if step is None or not hasattr(step, "handle"):
    return 0
  handle = step.handle.op
  ops = graph.get_operations()
  increments = [op for op in ops if op.type in _INCREMENTS and op.inputs[0].op is handle]
  if not increments:
    return 0
  later = _after(increments)
  reads = [op for op in ops if op.type in _READS and op.inputs[0].op is handle and op not in later]
  ordered = 0
  for increment in increments:  # one in mesh_tensorflow's step
    context = increment._get_control_flow_context()  # pylint: disable=protected-access
    same = [op for op in reads if op._get_control_flow_context() is context]  # pylint: disable=protected-access
    increment._add_control_inputs(same)  # pylint: disable=protected-access
    ordered += len(same)
  return ordered


def model_fn_builder(original):
  """A replacement for `tpu_estimator_model_fn`: its CPU training graphs ordered."""

  @functools.wraps(original)
  def tpu_estimator_model_fn(*args, **kwargs):
    model_fn = original(*args, **kwargs)
    if kwargs.get("use_tpu") or not settings()["ordered_step_reads"]:
      return model_fn

    @functools.wraps(model_fn)
    def ordered_model_fn(features, labels, mode, params=None, config=None):
      spec = model_fn(features, labels, mode, params=params, config=config)
      if mode == tf.estimator.ModeKeys.TRAIN:
        n = order_step_reads(spec.train_op.graph)
        tf.logging.info("st_moe.determinism: %d reads of the global step ordered before its "
                        "increment", n)
      return spec

    return ordered_model_fn

  setattr(tpu_estimator_model_fn, _ORIGINAL_ATTR, original)
  return tpu_estimator_model_fn


def install():
  """Patches `PlacementMeshImpl.random` and wraps `tpu_estimator_model_fn` (once per process)."""
  placement_mesh_impl.PlacementMeshImpl.random = seeded_random
  current = mtf_utils.tpu_estimator_model_fn
  if hasattr(current, _ORIGINAL_ATTR):
    return False
  mtf_utils.tpu_estimator_model_fn = model_fn_builder(current)
  tf.logging.info("st_moe.determinism: seeded random ops and an ordered global step on the "
                  "placement (CPU) mesh")
  return True
