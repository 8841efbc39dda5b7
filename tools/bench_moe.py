"""Benchmark: our sparse FFN against upstream mesh_tensorflow MoE1D, and against the matmul limit.

Layer mode (default): for each configuration, in ONE process, builds both layers with the same
settings (top-2, second policy "all" so both do the same work, GEGLU, same capacity factor and
group size) on the same input, and times forward + backward (the input's gradient included, as
inside a model) + an SGD update, alternating the two layers and a plain float32 matmul of the
expert size (warm-up first, then repetitions; medians are reported), so all three see the same
machine load. Before timing, ours gets upstream's weights and input and the outputs are compared.

Model mode: steps/s of st_moe_tiny trained by t5_mesh_transformer (through st_moe.experiments.runner), with
our SparseFFN and with upstream MoE1D swapped in by gin.

  python tools/bench_moe.py                 # default sweep: 8, 16, 32, 64 experts
  python tools/bench_moe.py --json          # one JSON object per configuration
  python tools/bench_moe.py --experts=8 --d_model=64 --hidden=128 --batch=2 --length=64 --reps=2
  python tools/bench_moe.py --experts=8,64 --profile --inter_op_threads=1   # per-op times
  python tools/bench_moe.py --mode=model --json

Expert FLOPs per step (what the efficiency counts): the expert buffers hold R = E x C x G rows
(C = max(min(S, int(S x cf / E)), 4) per group of S tokens, G groups; R = cf x T when that divides
evenly); each row goes through 3 matmuls (GEGLU: wi_0, wi_1, wo) of M x H, 2 FLOPs per MAC, and the
backward costs twice the forward (weight and input gradients): 3 x 2 x 3 x R x M x H. Routing,
dispatch and the update are overhead on top. The matmul calibration multiplies [R, M] by [M, H].

The update is TF's fused in-place SGD kernel on each variable slice by default (--update=mtf:
mtf.optimize.SgdOptimizer), the same for both layers. Results and analysis: docs/performance.md.
"""
import collections
import dataclasses
import functools
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
from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.training import gen_training_ops  # pylint: disable=g-direct-tensorflow-import

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
flags.DEFINE_integer("reps", 7, "Timed steps per layer (alternating the layers).")
flags.DEFINE_list("impls", ["ours", "upstream"], "Which layers to time.")
flags.DEFINE_enum("dispatch", "gather", ["einsum", "gather"], "Our layer's dispatch.")
flags.DEFINE_enum("update", "fused", ["fused", "mtf"],
                  "SGD update: TF's fused in-place kernel on each slice, or mtf.optimize."
                  "SgdOptimizer (out of place: three passes over the parameters).")
flags.DEFINE_integer("inter_op_threads", 0, "Session inter-op threads (0: TF's default).")
flags.DEFINE_bool("json", False, "Print one JSON object per configuration.")
flags.DEFINE_bool("profile", False, "Print (to stderr) where each layer's step spends its time: "
                  "op types and nodes of one traced step (TF timeline). Use "
                  "--inter_op_threads=1 for times that add up.")
flags.DEFINE_enum("mode", "layer", ["layer", "model"],
                  "layer: the sweep above; model: steps/s of st_moe_tiny trained by "
                  "t5_mesh_transformer with our SparseFFN vs upstream MoE1D (gin swap).")
flags.DEFINE_integer("model_steps", 60, "Model mode: training steps per run.")
flags.DEFINE_integer("model_batch", 16, "Model mode: sequences per batch.")
flags.DEFINE_integer("model_length", 128, "Model mode: input length (targets: a quarter).")
flags.DEFINE_string("model_task", "st_moe_embedded_span_corruption", "Model mode: SeqIO task.")
flags.DEFINE_multi_string("model_gin_param", [], "Model mode: more gin bindings for both runs, "
                          "e.g. --model_gin_param=num_experts=16 --model_gin_param=d_ff=1024.")
flags.DEFINE_string("model_workdir", "", "Model mode: empty directory for the two model_dirs "
                    "(default: a new temporary directory).")
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
  dispatch: str = "gather"
  update: str = "fused"

  @property
  def tokens(self):
    return self.batch * self.length

  @property
  def buffer_rows(self):
    """E x C x G: rows of the expert buffers (MTF capacity rule, not multiplied by k)."""
    from st_moe import routing  # pylint: disable=g-import-not-at-top
    groups, group = routing.group_tokens(self.tokens, self.group_size)
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


def _session_config():
  return tf.ConfigProto(allow_soft_placement=True,
                        inter_op_parallelism_threads=FLAGS.inter_op_threads)


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


def _load_weights(sessions, variables):
  """Copies upstream's router and expert weights and input into ours (names mapped)."""
  up_sess, up_vars = sessions["upstream"][0], variables["upstream"]
  ours_sess, ours_vars = sessions["ours"][0], variables["ours"]
  for ours_name, up_name in WEIGHT_NAMES.items():
    value = up_sess.run(up_vars[up_name].get_master())
    ours_vars[ours_name].get_master().load(value, ours_sess)


def run_config(cfg, impls, warmup, reps, check_agreement=True, measure_memory=True):
  """Times each impl on `cfg`, alternating; returns (results dict, outputs on equal weights).

  With check_agreement and both layers, ours gets upstream's weights and input first, and the
  outputs of both (before any step) are returned, so callers can compare them.
  """
  sess_config = _session_config()
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
    _load_weights(sessions, variables)
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
      if FLAGS.is_parsed() and FLAGS.profile:
        _print_profile(name, cfg, by_type, by_node)
  for sess, *_ in sessions.values():
    sess.close()
  calibration.sess.close()
  matmul_flops_per_s = calibration.flops / statistics.median(times["matmul"])
  result = {"experts": cfg.experts, "d_model": cfg.d_model, "hidden": cfg.hidden,
            "tokens": cfg.tokens, "group_size": cfg.group_size,
            "capacity_factor": cfg.capacity_factor, "dtype": cfg.dtype,
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
    result["max_abs_diff"] = float(np.abs(outputs["ours"] - outputs["upstream"]).max())
    result["output_max_abs"] = float(np.abs(outputs["upstream"]).max())
  return result, outputs


def _param_mb(variables):
  """MB of the layer's float32 weights (the input variable x excluded)."""
  return sum(v.outputs[0].shape.size * 4 for n, v in variables.items() if n != "x") / 1e6


# ---------------------------------------------------------------------------------------------
# Model level: st_moe_tiny trained by t5_mesh_transformer, our SparseFFN vs upstream MoE1D by gin.

def upstream_gin_params():
  """Gin bindings that swap upstream MoE1D into st_moe_tiny with our layer's settings."""
  return [
      "st_moe.sparse_layer_stack.sparse_ffn_layer = @moe.MoE1D",
      "moe.MoE1D.num_experts = %num_experts",
      "moe.MoE1D.hidden_size = %d_ff",
      "moe.MoE1D.activation = ['gelu', 'linear']",
      "moe.MoE1D.moe_gating = 'top_2'",
      "moe.MoE1D.group_size = %group_size",
      "moe.MoE1D.capacity_factor_train = %capacity_factor_train",
      "moe.MoE1D.capacity_factor_eval = %capacity_factor_eval",
      "moe.MoE1D.second_policy_train = 'random'",
      "moe.MoE1D.second_policy_eval = 'random'",
      "moe.MoE1D.second_threshold_train = 0.2",
      "moe.MoE1D.second_threshold_eval = 0.2",
      "moe.MoE1D.loss_coef = 1e-2",
      "moe.MoE1D.z_loss = 0.1",  # upstream weighs z_loss by loss_coef: 0.1 x 1e-2 = c_z 1e-3
  ]


def run_model_level(workdir):
  """steps/s of st_moe_tiny through t5_mesh_transformer, ours then upstream; returns dicts."""
  import os  # pylint: disable=g-import-not-at-top
  from st_moe.experiments import runner  # pylint: disable=g-import-not-at-top
  length = {"inputs": FLAGS.model_length, "targets": FLAGS.model_length // 4}
  common = [
      f"MIXTURE_NAME='{FLAGS.model_task}'",
      f"utils.run.batch_size=('sequences_per_batch', {FLAGS.model_batch})",
      f"utils.run.sequence_length={length!r}",
      f"utils.run.train_steps={FLAGS.model_steps}",
      f"utils.run.save_checkpoints_steps={FLAGS.model_steps}",
      f"utils.run.iterations_per_loop={FLAGS.model_steps}",
  ] + list(FLAGS.model_gin_param)
  gin_files = ["dataset.gin", "st_moe_tiny.gin", "cpu.gin"]
  tokens = runner.tokens_per_step(FLAGS.model_batch, length)
  results = []
  for name, params in (("ours", [f"st_moe.SparseFFN.dispatch='{FLAGS.dispatch}'"]),
                       ("upstream", upstream_gin_params())):
    model_dir = os.path.join(workdir, name)
    if runner.latest_checkpoint_step(model_dir):
      raise ValueError(f"--model_workdir={workdir!r} already holds a trained {name} model; "
                       "give an empty directory (a resumed run would train no steps)")
    run = runner.run(model_dir, gin_files, common + params, tokens_per_step=tokens, label=name,
                     show=lambda line: print(line, file=sys.stderr, flush=True),
                     module_imports=("mesh_tensorflow.transformer.moe",))
    if not run.ok or not run.tokens_per_second:
      raise RuntimeError(f"the {name} training run failed (return code {run.returncode}); "
                         f"see {run.log_path}")
    results.append({"model": "st_moe_tiny", "layer": name, "steps": len(run.steps),
                    "tokens_per_step": tokens,
                    "steps_per_s": run.tokens_per_second / tokens,
                    "tokens_per_s": run.tokens_per_second,
                    "command": runner.shell_quote(run.command)})
  return results


def _check_flags():
  """Bad settings, named, before anything is built."""
  for name in ("d_model", "hidden", "batch", "length", "group_size", "reps", "model_steps",
               "model_batch", "model_length"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: must be >= 1")
  if FLAGS.warmup < 0:
    raise app.UsageError(f"--warmup={FLAGS.warmup}: must be >= 0")
  if not FLAGS.capacity_factor > 0:
    raise app.UsageError(f"--capacity_factor={FLAGS.capacity_factor}: must be > 0 (e.g. 1.25)")
  for e in FLAGS.experts:
    if not e.isdigit() or int(e) < 2:
      raise app.UsageError(f"--experts={','.join(FLAGS.experts)}: each must be an integer >= 2 "
                           "(top-2 routing)")
  for name in FLAGS.impls:
    if name not in LAYERS:
      raise app.UsageError(f"--impls={','.join(FLAGS.impls)}: {name!r} is not one of "
                           f"{sorted(LAYERS)}")
  if FLAGS.mode == "model" and FLAGS.model_length % 4:
    raise app.UsageError(f"--model_length={FLAGS.model_length}: must be a multiple of 4 "
                         "(targets are a quarter of the inputs)")


def main(argv):
  del argv
  _check_flags()
  tf.disable_v2_behavior()
  import st_moe  # pylint: disable=g-import-not-at-top,unused-import
  # Resource variables (st_moe.use_resource_variables) for both layers, as in training.
  tf.logging.set_verbosity(tf.logging.WARN)
  run_from_flags()


def run_from_flags():
  """Runs what the flags ask for, printing as it goes; returns the list of result dicts."""
  if FLAGS.mode == "model":
    import tempfile  # pylint: disable=g-import-not-at-top
    workdir = FLAGS.model_workdir or tempfile.mkdtemp(prefix="bench_moe_model_")
    results = run_model_level(workdir)
    for r in results:
      print(json.dumps(r) if FLAGS.json else
            f"st_moe_tiny with {r['layer']:8s}: {r['steps_per_s']:6.2f} steps/s "
            f"({r['tokens_per_s']:8.0f} tokens/s)", flush=True)
    return results
  results = []
  for e in FLAGS.experts:
    cfg = Config(int(e), FLAGS.d_model, FLAGS.hidden, FLAGS.batch, FLAGS.length,
                 FLAGS.group_size, FLAGS.capacity_factor, FLAGS.dtype, FLAGS.dispatch,
                 FLAGS.update)
    result, _ = run_config(cfg, FLAGS.impls, FLAGS.warmup, FLAGS.reps,
                           check_agreement=FLAGS.check_agreement)
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
      if "max_abs_diff" in result:
        line += f"  max|ours-upstream| {result['max_abs_diff']:.1e}"
      print(line, flush=True)
  return results


if __name__ == "__main__":
  app.run(main)
