"""What st_moe.GuardedOptimizer costs: training step time with the guard on and off, side by side.

Both training steps are built in one process, in two graphs, by mesh_tensorflow's own model
function (`utils.tpu_estimator_model_fn`, as t5_mesh_transformer builds it on the CPU, with the
gin files of a run: a model file, cpu.gin, pretrain_c4.gin), on the same fixed batch; only
`optimizer` differs (`st_moe.GuardedOptimizer` around Adafactor vs `optimize.AdafactorOptimizer`).
The two are stepped alternately (off, on, on, off, off, on, ...) after warm-up steps, so machine
load hits both alike; reported: both medians, their ratio, and the median of the per-rep ratios. No input pipeline, no checkpoints.

  python -m st_moe.experiments.bench_guard                # st_moe_tiny and a 4x wider model
  python -m st_moe.experiments.bench_guard --reps=40 --configs=tiny

Results: docs/performance.md ("Cost of the non-finite guard").
"""
import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

CONFIGS = {
    # name: (model gin file, extra bindings, sequences per batch, {inputs, targets})
    "tiny": ("st_moe_tiny.gin", [], 16, {"inputs": 128, "targets": 32}),
    "wider": ("st_moe_tiny.gin", ["d_model = 128", "d_ff = 512", "num_heads = 4", "d_kv = 32",
                                  "num_experts = 8"], 16, {"inputs": 128, "targets": 32}),
}
VOCAB_SIZE = 2100  # the embedded vocabulary's size (2000 pieces + 100 extra ids)


def _step(guarded, batch_size, lengths, seed=0):
  """(session, train_op, parameter count) of one training step; gin must be parsed."""
  import mesh_tensorflow as mtf  # pylint: disable=g-import-not-at-top
  from mesh_tensorflow import optimize  # pylint: disable=g-import-not-at-top
  from mesh_tensorflow.transformer import learning_rate_schedules  # pylint: disable=g-import-not-at-top
  from mesh_tensorflow.transformer import utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  from st_moe import guard  # pylint: disable=g-import-not-at-top

  import gin  # pylint: disable=g-import-not-at-top
  mesh_shape = mtf.convert_to_shape(gin.query_parameter("utils.run.mesh_shape"))
  layout_rules = mtf.convert_to_layout_rules(gin.query_parameter("utils.run.layout_rules"))
  graph = tf.Graph()
  with graph.as_default():
    tf.random.set_random_seed(seed)
    tf.train.get_or_create_global_step()
    model = utils.build_model("bitransformer", input_vocab_size=VOCAB_SIZE,
                              output_vocab_size=VOCAB_SIZE, layout_rules=layout_rules,
                              mesh_shape=mesh_shape)
    model_fn = utils.tpu_estimator_model_fn(
        model_type="bitransformer", transformer_model=model,
        vocabulary=seqio.PassThroughVocabulary(VOCAB_SIZE), model_dir=tempfile.mkdtemp(),
        use_tpu=False, mesh_shape=mesh_shape, layout_rules=layout_rules, batch_size=batch_size,
        sequence_length=lengths, autostack=True, keep_checkpoint_max=1,
        save_checkpoints_steps=10**9,
        learning_rate_schedule=functools.partial(  # as utils.run binds it
            learning_rate_schedules.learning_rate_schedule_noam, total_train_steps=10**6),
        optimizer=guard.GuardedOptimizer if guarded else optimize.AdafactorOptimizer)
    rng = np.random.RandomState(seed)
    features = {k: tf.constant(rng.randint(3, VOCAB_SIZE - 100, size=[batch_size, n]), tf.int32)
                for k, n in lengths.items()}
    spec = model_fn(features, None, tf.estimator.ModeKeys.TRAIN, params={})
    hooks = [h for h in spec.training_chief_hooks
             if type(h).__name__ in ("MtfRestoreHook", "_WriterHook")]
    for hook in hooks:
      hook.begin()
    params = sum(int(np.prod(v.shape.as_list())) for v in tf.trainable_variables())
    session = tf.Session(graph=graph)
    session.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
    for hook in hooks:
      hook.after_create_session(session, None)
  return session, spec.train_op, params


def measure(name, reps=25, warmup=3):
  """{config, params, off_ms, on_ms, ratio, pair_ratio_median, reps} for one entry of CONFIGS."""
  import gin  # pylint: disable=g-import-not-at-top
  import st_moe.register  # pylint: disable=g-import-not-at-top,unused-import
  model_file, bindings, batch_size, lengths = CONFIGS[name]
  from mesh_tensorflow.transformer import utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  # mesh_tensorflow's defaults first, as t5_mesh_transformer parses them (parse_gin_defaults...).
  gin.parse_config_file(os.path.join(os.path.dirname(utils.__file__), "gin", "defaults.gin"))
  gin.parse_config_files_and_bindings(
      [model_file, "cpu.gin", "pretrain_c4.gin"],
      bindings + ["utils.run.train_steps = 1",
                  "utils.get_variable_dtype.slice_dtype = 'float32'",
                  "utils.get_variable_dtype.activation_dtype = 'float32'"])
  arms = {"off": _step(False, batch_size, lengths), "on": _step(True, batch_size, lengths)}
  times = {"off": [], "on": []}
  for rep in range(warmup + reps):
    for arm in (("off", "on") if rep % 2 == 0 else ("on", "off")):  # neither always goes first
      session, train_op, _ = arms[arm]
      start = time.perf_counter()
      session.run(train_op)
      if rep >= warmup:
        times[arm].append(1000 * (time.perf_counter() - start))
  off, on = statistics.median(times["off"]), statistics.median(times["on"])
  # Each rep's on/off ratio: the two steps of a rep ran seconds apart, under the same load.
  pair = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
  for session, _, _ in arms.values():
    session.close()
  return {"config": name, "model": model_file, "bindings": bindings, "batch_size": batch_size,
          "sequence_length": lengths, "params": arms["on"][2], "reps": reps,
          "off_ms": round(off, 2), "on_ms": round(on, 2), "ratio": round(on / off, 4),
          "pair_ratio_median": round(pair, 4)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: "
                      + ", ".join(CONFIGS))
  parser.add_argument("--reps", type=int, default=25, help="timed steps per arm")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm")
  args = parser.parse_args(argv)
  names = [n for n in args.configs.split(",") if n]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown or args.reps < 1 or args.warmup < 0:
    parser.error(f"--configs: choose from {sorted(CONFIGS)} (got {unknown}); --reps >= 1, "
                 "--warmup >= 0")
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  tf.disable_v2_behavior()
  for name in names:
    print(json.dumps(measure(name, args.reps, args.warmup)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
