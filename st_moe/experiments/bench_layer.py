"""Layer benchmark: our SparseFFN against upstream mesh_tensorflow MoE1D and the matmul limit.

For one configuration (Config), in ONE process, builds both layers with the same settings (top-2,
second policy "all" so both do the same work, GEGLU, same capacity factor and group size) on the
same input, and times forward + backward (the input's gradient included, as inside a model) + an
SGD update, alternating the two layers and a plain float32 matmul of the expert size (warm-up
first, then repetitions; medians are reported), so all three see the same machine load. Before
timing, ours gets upstream's weights and input and the outputs are compared. CLI:
tools/bench_moe.py; results and analysis: docs/performance.md.

Expert FLOPs per step (what the efficiency counts): the expert buffers hold R = E x C x G rows
(C = routing.expert_capacity(S, cf, E) = max(min(S, int(S x cf / E)), 4) per group of S tokens,
G groups); each row goes through 3 matmuls (GEGLU: wi_0, wi_1, wo) of M x H, 2 FLOPs per MAC, and
the backward costs twice the forward (weight and input gradients): 3 x 2 x 3 x R x M x H. Routing,
dispatch and the update are overhead on top. The matmul calibration multiplies [R, M] by [M, H].

The update is TF's fused in-place SGD kernel on each variable slice by default (update="mtf":
mtf.optimize.SgdOptimizer), the same for both layers.
"""
import collections
import dataclasses
import functools
import statistics
import sys
import time
import types

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import moe as upstream_moe
import numpy as np
import tensorflow.compat.v1 as tf
from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.training import gen_training_ops  # pylint: disable=g-direct-tensorflow-import

from st_moe import layers
from st_moe import routing


@dataclasses.dataclass
class Config:
  experts: int
  d_model: int
  hidden: int
  batch_size: int
  length: int
  group_size: int
  capacity_factor_train: float
  dtype: str = "float32"
  dispatch: str = "gather"
  update: str = "fused"

  @property
  def tokens(self):
    return self.batch_size * self.length

  @property
  def buffer_rows(self):
    """E x C x G: rows of the expert buffers (MTF capacity rule, not multiplied by k)."""
    groups, group = routing.group_tokens(self.tokens, self.group_size)
    return self.experts * self.capacity * groups

  @property
  def capacity(self):
    """C: buffer slots per expert and group, as both layers compute it (routing.expert_capacity)."""
    _, group = routing.group_tokens(self.tokens, self.group_size)
    return routing.expert_capacity(group, self.capacity_factor_train, self.experts)

  def expert_flops(self):
    """Expert FLOPs per step: forward + backward of the three GEGLU matmuls over the buffers."""
    forward = 2 * 3 * self.buffer_rows * self.d_model * self.hidden
    return 3 * forward


def upstream_layer(cfg):
  return upstream_moe.MoE1D(
      num_experts=cfg.experts, hidden_size=cfg.hidden, group_size=cfg.group_size,
      capacity_factor_train=cfg.capacity_factor_train, capacity_factor_eval=cfg.capacity_factor_train,
      second_policy_train="all", second_policy_eval="all", activation=["gelu", "linear"],
      moe_gating="top_2", loss_coef=1e-2, z_loss=0.1)


def our_layer(cfg):
  return layers.SparseFFN(
      num_experts=cfg.experts, hidden_size=cfg.hidden, group_size=cfg.group_size,
      capacity_factor_train=cfg.capacity_factor_train, capacity_factor_eval=cfg.capacity_factor_train,
      second_policy_train="all", second_policy_eval="all", activation=("gelu", "linear"),
      num_selected_experts=2, balance_loss_coef=1e-2, router_z_loss_coef=1e-3,
      dispatch=cfg.dispatch)


LAYERS = {"ours": our_layer, "upstream": upstream_layer}
# ours -> upstream variable names (the input x too, so both see the same tokens).
WEIGHT_NAMES = {"x": "x", "layer/router/kernel": "layer/top_2_gating/kernel",
                "layer/wi_0/kernel": "layer/wi_0/kernel", "layer/wi_1/kernel": "layer/wi_1/kernel",
                "layer/wo/kernel": "layer/wo/kernel"}


class _Model(types.SimpleNamespace):
  """The attributes of a Unitransformer that MoE layers read from `context.model`."""


LEARNING_RATE = 1e-3


def _sgd_slice(variable, slice_var, grad):
  """SGD on one variable slice with TF's fused in-place kernel (as tf.train.GradientDescent does).

  mtf's SgdOptimizer computes `slice - lr * grad` out of place and assigns it: three passes over
  memory per parameter and a temporary, ~100 ms more per step at 64 experts (800 MB of expert
  weights) here; --update=mtf selects it.
  """
  alpha = tf.constant(LEARNING_RATE, variable.slice_dtype)
  delta = tf.cast(grad, variable.slice_dtype)
  if isinstance(slice_var, resource_variable_ops.BaseResourceVariable):
    return gen_training_ops.resource_apply_gradient_descent(slice_var.handle, alpha, delta)
  return gen_training_ops.apply_gradient_descent(slice_var, alpha, delta)


def build_step(layer, cfg, seed=1):
  """One training step of `layer` alone.

  Returns:
    (lowering, loss, output y [batch, length, d_model], train op, mtf graph), tf objects in the
    default tf graph.
  """
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
  batch_dim = mtf.Dimension("batch", cfg.batch_size)
  length_dim = mtf.Dimension("length", cfg.length)
  model_dim = mtf.Dimension("d_model", cfg.d_model)
  activation_dtype = tf.bfloat16 if cfg.dtype == "bfloat16" else tf.float32
  variable_dtype = mtf.VariableDType(tf.float32, tf.float32, activation_dtype)
  tf.random.set_random_seed(seed)
  # The input is a variable so that its gradient is computed, as it is for a layer inside a model.
  x = mtf.get_variable(mesh, "x", mtf.Shape([batch_dim, length_dim, model_dim]),
                       initializer=tf.random_normal_initializer(), dtype=variable_dtype)
  model = _Model(ensemble_dim=None, model_dim=model_dim, layout="", mesh_shape="")
  context = mtf.transformer.transformer.Context(
      model=model, mesh=mesh, batch_dims=[batch_dim], length_dim=length_dim,
      variable_dtype=variable_dtype, mode="train", losses=[],
      sequence_id=mtf.ones(mesh, mtf.Shape([batch_dim, length_dim]), tf.int32))
  with tf.variable_scope("layer"):
    y = layer.call(context, x)
  loss = mtf.reduce_mean(mtf.square(mtf.cast(y, tf.float32)))
  for extra in context.losses:
    loss += mtf.cast(extra, tf.float32)
  variables = graph.trainable_variables
  grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
  if cfg.update == "fused":
    update_ops = [mtf.assign(v, g, assign_fn=_sgd_slice) for v, g in zip(variables, grads)]
  else:
    update_ops = mtf.optimize.SgdOptimizer(LEARNING_RATE).apply_grads(grads, variables)
  lowering = mtf.Lowering(graph, {mesh: mesh_impl})
  tf_loss = lowering.export_to_tf_tensor(loss)
  tf_y = lowering.export_to_tf_tensor(y)
  train_op = tf.group([lowering.lowered_operation(op) for op in update_ops])
  return lowering, tf_loss, tf_y, train_op, graph


class MatmulCalibration:
  """A plain float32 matmul [R, M] x [M, H] (R = expert buffer rows), the expert matmuls' size.

  Timed in the same loop as the layers (alternating), so that it sees the same machine load.
  """

  def __init__(self, cfg, sess_config):
    self.flops = 2 * cfg.buffer_rows * cfg.d_model * cfg.hidden
    graph = tf.Graph()
    with graph.as_default():
      a = tf.Variable(tf.random.normal([cfg.buffer_rows, cfg.d_model]))
      b = tf.Variable(tf.random.normal([cfg.d_model, cfg.hidden]))
      self.op = tf.reduce_sum(tf.matmul(a, b))
      self.sess = tf.Session(graph=graph, config=sess_config)
      self.sess.run(tf.global_variables_initializer())

  def run(self):
    self.sess.run(self.op)


def _session_config(inter_op_threads=0):
  return tf.ConfigProto(allow_soft_placement=True,
                        inter_op_parallelism_threads=inter_op_threads)


def _traced_step(sess, train_op):
  """One step under FULL_TRACE; returns (step peak MB or None, per-op-type ms, per-node ms).

  Both layers live in one process, so the absolute bytes in use include the other session's
  variables: the peak minus the lowest level seen during the step is the step's own working set.
  """
  metadata = tf.RunMetadata()
  sess.run(train_op, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
           run_metadata=metadata)
  levels, by_type, by_node = [], collections.Counter(), collections.Counter()
  for dev in metadata.step_stats.dev_stats:
    for node in dev.node_stats:
      levels += [m.allocator_bytes_in_use for m in node.memory if m.allocator_bytes_in_use]
      op_type = node.timeline_label.split("=")[-1].split("(")[0].strip() or "?"
      by_type[op_type] += node.all_end_rel_micros / 1e3
      by_node[node.node_name] += node.all_end_rel_micros / 1e3
  peak = (max(levels) - min(levels)) / 1e6 if levels else None
  return peak, by_type, by_node


def _print_profile(name, cfg, by_type, by_node, top=15):
  out = sys.stderr
  print(f"--- {name}, {cfg.experts} experts: op time by type (ms, summed over threads)", file=out)
  for op_type, ms in by_type.most_common(top):
    print(f"{ms:9.1f}  {op_type}", file=out)
  print(f"--- {name}, {cfg.experts} experts: slowest nodes (ms)", file=out)
  for node, ms in by_node.most_common(top):
    print(f"{ms:9.1f}  {node}", file=out)


def to_bfloat16_grid(value):
  """numpy float32 values rounded to the nearest bfloat16 (round to nearest even), as float32."""
  bits = np.asarray(value, dtype=np.float32).view(np.uint32).astype(np.uint64)
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
  return rounded.astype(np.uint32).view(np.float32)


def _load_weights(sessions, variables, router_on_bfloat16_grid=False):
  """Copies upstream's router and expert weights and input into ours (names mapped).

  router_on_bfloat16_grid: first rounds the router kernel to bfloat16 values in both layers.
  Upstream's router (mtf.layers.dense with the model's VariableDType) casts its kernel to the
  activation dtype and back before its float32 product, ours keeps the float32 kernel; on the
  bfloat16 grid the two products are the same, so what then still differs is not the router.
  """
  up_sess, up_vars = sessions["upstream"][0], variables["upstream"]
  ours_sess, ours_vars = sessions["ours"][0], variables["ours"]
  for ours_name, up_name in WEIGHT_NAMES.items():
    value = up_sess.run(up_vars[up_name].get_master())
    if router_on_bfloat16_grid and ours_name == "layer/router/kernel":
      value = to_bfloat16_grid(value)
      up_vars[up_name].get_master().load(value, up_sess)
    ours_vars[ours_name].get_master().load(value, ours_sess)


def agreement(ours, upstream):
  """How far two layers' outputs on the same tokens differ: the largest absolute difference, and
  the fractions of tokens whose difference (L2 over d_model) exceeds 1% and 10% of upstream's
  output norm for that token."""
  ours = np.asarray(ours, np.float64).reshape(-1, np.shape(ours)[-1])
  upstream = np.asarray(upstream, np.float64).reshape(-1, np.shape(upstream)[-1])
  diff = np.linalg.norm(ours - upstream, axis=-1)
  norm = np.maximum(np.linalg.norm(upstream, axis=-1), 1e-30)
  return {"max_abs_diff": float(np.abs(ours - upstream).max()),
          "output_max_abs": float(np.abs(upstream).max()),
          "tokens_over_1pct": float(np.mean(diff > 0.01 * norm)),
          "tokens_over_10pct": float(np.mean(diff > 0.1 * norm))}


def run_config(cfg, impls, warmup, reps, check_agreement=True, measure_memory=True,
               profile=False, inter_op_threads=0, router_on_bfloat16_grid=False):
  """Times each impl on `cfg`, alternating; returns (results dict, outputs on equal weights).

  With check_agreement and both layers, ours gets upstream's weights and input first, and the
  outputs of both (before any step) are returned, so callers can compare them. profile=True
  prints to stderr where each layer's step spends its time.
  """
  sess_config = _session_config(inter_op_threads)
  sessions, variables, outputs = {}, {}, {}
  for name in impls:
    g = tf.Graph()
    with g.as_default():
      lowering, tf_loss, tf_y, train_op, graph = build_step(LAYERS[name](cfg), cfg)
      sess = tf.Session(graph=g, config=sess_config)
      sess.run(tf.global_variables_initializer())
      sessions[name] = (sess, train_op, tf_loss, tf_y, lowering.copy_masters_to_slices())
      variables[name] = {v.name: v for v in graph.all_variables}
  agree = check_agreement and "ours" in impls and "upstream" in impls
  if agree:
    _load_weights(sessions, variables, router_on_bfloat16_grid)
  for name, (sess, _, _, tf_y, copy_op) in sessions.items():
    sess.run(copy_op)
    if agree:
      outputs[name] = sess.run(tf_y)
  calibration = MatmulCalibration(cfg, sess_config)
  steps = {name: functools.partial(sessions[name][0].run, sessions[name][1]) for name in impls}
  steps["matmul"] = calibration.run
  times = {name: [] for name in steps}
  for _ in range(warmup + 1):  # the matmul's first run is its warm-up
    for step in steps.values():
      step()
  for _ in range(reps):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  peaks = {}
  if measure_memory:
    for name in impls:
      peaks[name], by_type, by_node = _traced_step(*sessions[name][:2])
      if profile:
        _print_profile(name, cfg, by_type, by_node)
  for sess, *_ in sessions.values():
    sess.close()
  calibration.sess.close()
  matmul_flops_per_s = calibration.flops / statistics.median(times["matmul"])
  result = {"experts": cfg.experts, "d_model": cfg.d_model, "hidden": cfg.hidden,
            "tokens": cfg.tokens, "group_size": cfg.group_size,
            "capacity_factor_train": cfg.capacity_factor_train, "expert_capacity": cfg.capacity,
            "dtype": cfg.dtype,
            "dispatch": cfg.dispatch, "update": cfg.update,
            "expert_gflop_per_step": cfg.expert_flops() / 1e9,
            "matmul_gflop_per_s": matmul_flops_per_s / 1e9}
  for name in impls:
    ms = 1e3 * statistics.median(times[name])
    result[f"{name}_ms"] = ms
    result[f"{name}_ms_all"] = [round(1e3 * t, 1) for t in times[name]]
    result[f"{name}_efficiency"] = cfg.expert_flops() / (ms / 1e3) / matmul_flops_per_s
    if measure_memory:
      result[f"{name}_step_peak_mb"] = peaks[name]
    result[f"{name}_param_mb"] = _param_mb(variables[name])
  if "ours" in impls and "upstream" in impls:
    result["speedup"] = result["upstream_ms"] / result["ours_ms"]
  if agree:
    result.update(agreement(outputs["ours"], outputs["upstream"]))
    result["router_on_bfloat16_grid"] = bool(router_on_bfloat16_grid)
  return result, outputs


def _param_mb(variables):
  """MB of the layer's float32 weights (the input variable x excluded)."""
  return sum(v.outputs[0].shape.size * 4 for n, v in variables.items() if n != "x") / 1e6
