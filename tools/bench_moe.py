"""Benchmark: our sparse FFN against upstream mesh_tensorflow MoE1D, and against the matmul limit.

For each configuration, in ONE process, builds both layers with the same settings (top-2, second
policy "all" so both do the same work, GEGLU, same capacity factor and group size) on the same input,
and times forward + backward (the input's gradient included, as inside a model) + an SGD update,
alternating the two layers (warm-up first, then repetitions; medians are reported). A plain float32
matmul with the same FLOPs calibrates what this machine can do.

  python tools/bench_moe.py                 # default sweep: 8, 16, 32, 64 experts
  python tools/bench_moe.py --json          # one JSON object per configuration
  python tools/bench_moe.py --experts=8 --d_model=64 --hidden=128 --batch=2 --length=64 --reps=2

Expert FLOPs per step (what the efficiency counts): the expert buffers hold R = E x C x G rows
(C = max(min(S, int(S x cf / E)), 4) per group of S tokens, G groups; R = cf x T when that divides
evenly); each row goes through 3 matmuls (GEGLU: wi_0, wi_1, wo) of M x H, 2 FLOPs per MAC, and the
backward costs twice the forward (weight and input gradients): 3 x 2 x 3 x R x M x H. Routing and
dispatch are overhead on top. The matmul calibration multiplies [R, M] by [M, H].
"""
import dataclasses
import json
import statistics
import sys
import time
import types

from absl import app
from absl import flags
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import moe as upstream_moe
import numpy as np
import tensorflow.compat.v1 as tf

FLAGS = flags.FLAGS
flags.DEFINE_list("experts", ["8", "16", "32", "64"], "Numbers of experts to sweep.")
flags.DEFINE_integer("d_model", 512, "Model dimension M.")
flags.DEFINE_integer("hidden", 2048, "Expert hidden size H (GEGLU).")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("length", 512, "Tokens per sequence.")
flags.DEFINE_integer("group_size", 1024, "Routing group size S.")
flags.DEFINE_float("capacity_factor", 1.25, "Train capacity factor (both layers).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per layer before timing.")
flags.DEFINE_integer("reps", 3, "Timed steps per layer (alternating the layers).")
flags.DEFINE_list("impls", ["ours", "upstream"], "Which layers to time.")
flags.DEFINE_bool("json", False, "Print one JSON object per configuration.")
flags.DEFINE_bool("check_agreement", True,
                  "Also check that both layers give the same output on the same weights.")


@dataclasses.dataclass
class Config:
  experts: int
  d_model: int
  hidden: int
  batch: int
  length: int
  group_size: int
  capacity_factor: float
  dtype: str = "float32"

  @property
  def tokens(self):
    return self.batch * self.length

  @property
  def buffer_rows(self):
    """E x C x G: rows of the expert buffers (MTF capacity rule, not multiplied by k)."""
    groups = -(-self.tokens // self.group_size)
    group = self.tokens // groups
    capacity = max(min(group, int(group * self.capacity_factor / self.experts)), 4)
    return self.experts * capacity * groups

  def expert_flops(self):
    """Expert FLOPs per step: forward + backward of the three GEGLU matmuls over the buffers."""
    forward = 2 * 3 * self.buffer_rows * self.d_model * self.hidden
    return 3 * forward


def upstream_layer(cfg):
  return upstream_moe.MoE1D(
      num_experts=cfg.experts, hidden_size=cfg.hidden, group_size=cfg.group_size,
      capacity_factor_train=cfg.capacity_factor, capacity_factor_eval=cfg.capacity_factor,
      second_policy_train="all", second_policy_eval="all", activation=["gelu", "linear"],
      moe_gating="top_2", loss_coef=1e-2, z_loss=0.1)


def our_layer(cfg):
  import st_moe  # pylint: disable=g-import-not-at-top
  return st_moe.layers.SparseFFN(
      num_experts=cfg.experts, hidden_size=cfg.hidden, group_size=cfg.group_size,
      capacity_factor_train=cfg.capacity_factor, capacity_factor_eval=cfg.capacity_factor,
      second_policy_train="all", second_policy_eval="all", activation=("gelu", "linear"),
      num_selected_experts=2, balance_loss_coef=1e-2, router_z_loss_coef=1e-3)


LAYERS = {"ours": our_layer, "upstream": upstream_layer}


class _Model(types.SimpleNamespace):
  """The attributes of a Unitransformer that MoE layers read from `context.model`."""


def build_step(layer, cfg, seed=1):
  """Graph of one training step of `layer` alone; returns (graph, fetches, lowering-time tensors)."""
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
  batch_dim = mtf.Dimension("batch", cfg.batch)
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
  update_ops = mtf.optimize.SgdOptimizer(1e-3).apply_grads(grads, variables)
  lowering = mtf.Lowering(graph, {mesh: mesh_impl})
  tf_loss = lowering.export_to_tf_tensor(loss)
  tf_y = lowering.export_to_tf_tensor(y)
  train_op = tf.group([lowering.lowered_operation(op) for op in update_ops])
  return lowering, tf_loss, tf_y, train_op


def calibrate_matmul(cfg, sess_config, reps=5):
  """FLOP/s of a plain float32 matmul [R, M] x [M, H], the size of the expert matmuls."""
  g = tf.Graph()
  with g.as_default():
    a = tf.Variable(tf.random.normal([cfg.buffer_rows, cfg.d_model]))
    b = tf.Variable(tf.random.normal([cfg.d_model, cfg.hidden]))
    c = tf.reduce_sum(tf.matmul(a, b))
    with tf.Session(config=sess_config) as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(c)
      times = []
      for _ in range(reps):
        start = time.perf_counter()
        sess.run(c)
        times.append(time.perf_counter() - start)
  return 2 * cfg.buffer_rows * cfg.d_model * cfg.hidden / statistics.median(times)


def run_config(cfg, impls, warmup, reps, check_agreement=True):
  """Times each impl on `cfg`, alternating; returns a dict of results."""
  sess_config = tf.ConfigProto(allow_soft_placement=True)
  sessions = {}
  outputs = {}
  for name in impls:
    g = tf.Graph()
    with g.as_default():
      lowering, tf_loss, tf_y, train_op = build_step(LAYERS[name](cfg), cfg)
      init = [tf.global_variables_initializer(), lowering.copy_masters_to_slices()]
      sess = tf.Session(graph=g, config=sess_config)
      sess.run(init[0])
      sess.run(init[1])
      if check_agreement:
        outputs[name] = sess.run(tf_y)
      sessions[name] = (sess, train_op, tf_loss)
  times = {name: [] for name in impls}
  for _ in range(warmup):
    for name in impls:
      sess, train_op, _ = sessions[name]
      sess.run(train_op)
  for _ in range(reps):
    for name in impls:
      sess, train_op, _ = sessions[name]
      start = time.perf_counter()
      sess.run(train_op)
      times[name].append(time.perf_counter() - start)
  for sess, _, _ in sessions.values():
    sess.close()
  matmul_flops_per_s = calibrate_matmul(cfg, sess_config)
  result = {"experts": cfg.experts, "d_model": cfg.d_model, "hidden": cfg.hidden,
            "tokens": cfg.tokens, "group_size": cfg.group_size,
            "capacity_factor": cfg.capacity_factor, "dtype": cfg.dtype,
            "expert_gflop_per_step": cfg.expert_flops() / 1e9,
            "matmul_gflop_per_s": matmul_flops_per_s / 1e9}
  for name in impls:
    ms = 1e3 * statistics.median(times[name])
    result[f"{name}_ms"] = ms
    result[f"{name}_efficiency"] = cfg.expert_flops() / (ms / 1e3) / matmul_flops_per_s
  if "ours" in impls and "upstream" in impls:
    result["speedup"] = result["upstream_ms"] / result["ours_ms"]
  return result, outputs


def main(argv):
  del argv
  tf.disable_v2_behavior()
  results = []
  for e in FLAGS.experts:
    cfg = Config(int(e), FLAGS.d_model, FLAGS.hidden, FLAGS.batch, FLAGS.length,
                 FLAGS.group_size, FLAGS.capacity_factor, FLAGS.dtype)
    result, _ = run_config(cfg, FLAGS.impls, FLAGS.warmup, FLAGS.reps, check_agreement=False)
    results.append(result)
    if FLAGS.json:
      print(json.dumps(result), flush=True)
    else:
      line = f"experts={cfg.experts:3d}"
      for name in FLAGS.impls:
        line += (f"  {name}: {result[name + '_ms']:8.1f} ms/step "
                 f"({100 * result[name + '_efficiency']:5.1f}% of matmul)")
      if "speedup" in result:
        line += f"  speedup {result['speedup']:.2f}x"
      print(line, flush=True)
  return results


if __name__ == "__main__":
  app.run(main)
