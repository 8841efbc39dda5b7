r"""Layer benchmark (our sparse FFN against upstream MoE1D and the matmul limit), and with
--mode=model the tables' sparse model against its FLOP-matched dense twin, trained end to end.

--mode=layer (the default): for each number of experts, times one training step (forward,
backward including the input's gradient, SGD update) of both layers built with the same settings,
alternating with a matmul of the expert size; checks first that both give the same output on the
same weights. What is timed and how the efficiency is counted: st_moe/experiments/bench_layer.py.
The model-level benchmark (st_moe_tiny through t5_mesh_transformer, ours against upstream) is
tools/bench_model.py.

--mode=model: trains the --scale's sparse model and its dense twin (small: st_moe_small.gin and
dense_small.gin) as `tools/reproduce.py sparse_vs_dense` trains them (same gin files, batch,
lengths, task, seed 0) for --train_steps steps each, one run at a time (--rounds alternate the
order), and reports their tokens/s and the ratio sparse / dense (st_moe.experiments.bench_model).

Results: docs/performance.md.

  bench_moe.py                 # default sweep: 8, 16, 32, 64 experts
  bench_moe.py --json          # one JSON object per configuration
  bench_moe.py --experts=8 --d_model=64 --hidden=128 --batch_size=2 --length=64 --reps=2
  bench_moe.py --experts=8,64 --profile --inter_op_threads=1   # per-op times
  bench_moe.py --mode=model --scale=small --train_steps=60 --rounds=2   # sparse vs dense twin
"""
import json
import tempfile

from absl import app
from absl import flags
import tensorflow.compat.v1 as tf

from st_moe.experiments import bench_layer

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "layer", ["layer", "model"], "layer: the sparse FFN alone, ours against "
                  "upstream; model: the scale's sparse model against its dense twin, end to end.")
flags.DEFINE_enum("scale", "small", ["tiny", "small"], "--mode=model: the tables' CPU scale.")
flags.DEFINE_integer("train_steps", 60, "--mode=model: training steps per run (>= 3).")
flags.DEFINE_integer("rounds", 1, "--mode=model: runs per model (the order alternates).")
flags.DEFINE_string("workdir", "", "--mode=model: an empty folder for the runs (default: a new "
                    "temporary folder).")
if "gin_param" not in FLAGS:
  flags.DEFINE_multi_string("gin_param", [], "--mode=model: a gin binding for both models.")
flags.DEFINE_list("experts", ["8", "16", "32", "64"], "Numbers of experts to sweep.")
flags.DEFINE_integer("d_model", 512, "Model dimension M.")
flags.DEFINE_integer("hidden", 2048, "Expert hidden size H (GEGLU).")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("length", 512, "Tokens per sequence.")
flags.DEFINE_integer("group_size", 1024, "Routing group size S.")
flags.DEFINE_float("capacity_factor_train", 1.25,
                   "Train capacity factor of both layers (the step is a training step).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per layer before timing.")
flags.DEFINE_integer("reps", 7, "Timed steps per layer (alternating the layers).")
flags.DEFINE_list("impls", ["ours", "upstream"], "Which layers to time.")
flags.DEFINE_enum("dispatch", "gather", ["einsum", "gather"], "Our layer's dispatch.")
flags.DEFINE_enum("update", "fused", ["fused", "mtf"],
                  "SGD update: TF's fused in-place kernel on each slice, or mtf.optimize."
                  "SgdOptimizer (out of place: three passes over the parameters).")
flags.DEFINE_bool("router_on_bfloat16_grid", False,
                  "Agreement check: round the router kernel to bfloat16 values in both layers first "
                  "(upstream's router rounds its kernel to the activation dtype, ours keeps it in "
                  "float32; with --dtype=bfloat16 this separates that difference from the rest).")
flags.DEFINE_integer("inter_op_threads", 0, "Session inter-op threads (0: TF's default).")
flags.DEFINE_bool("json", False, "Print one JSON object per configuration.")
flags.DEFINE_bool("profile", False, "Print (to stderr) where each layer's step spends its time: "
                  "op types and nodes of one traced step (TF timeline). Use "
                  "--inter_op_threads=1 for times that add up.")
flags.DEFINE_bool("check_agreement", True,
                  "Also check that both layers give the same output on the same weights.")


def _check_flags():
  """Bad settings, named, before anything is built."""
  for name in ("d_model", "hidden", "batch_size", "length", "group_size", "reps"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: must be >= 1")
  if FLAGS.warmup < 0:
    raise app.UsageError(f"--warmup={FLAGS.warmup}: must be >= 0")
  if not FLAGS.capacity_factor_train > 0:
    raise app.UsageError(f"--capacity_factor_train={FLAGS.capacity_factor_train}: must be > 0 "
                         "(e.g. 1.25)")
  for e in FLAGS.experts:
    if not e.isdigit() or int(e) < 2:
      raise app.UsageError(f"--experts={','.join(FLAGS.experts)}: each must be an integer >= 2 "
                           "(top-2 routing)")
  for name in FLAGS.impls:
    if name not in bench_layer.LAYERS:
      raise app.UsageError(f"--impls={','.join(FLAGS.impls)}: {name!r} is not one of "
                           f"{sorted(bench_layer.LAYERS)}")


def _model_mode():
  """--mode=model: the scale's sparse model and dense twin, tokens/s and their ratio."""
  from st_moe.experiments import bench_model  # pylint: disable=g-import-not-at-top
  if FLAGS.train_steps < 3:
    raise app.UsageError(f"--train_steps={FLAGS.train_steps}: must be >= 3 (throughput is "
                         "measured from the second step on)")
  if FLAGS.rounds < 1:
    raise app.UsageError(f"--rounds={FLAGS.rounds}: must be >= 1")
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_moe_model_")
  r = bench_model.sparse_vs_dense(workdir, scale=FLAGS.scale, train_steps=FLAGS.train_steps,
                                  rounds=FLAGS.rounds, gin_params=FLAGS.gin_param or ())
  if FLAGS.json:
    print(json.dumps(r), flush=True)
    return
  per_round = ", ".join(f"{s:.0f} / {d:.0f}" for s, d in zip(r["sparse"], r["dense"]))
  print(f"scale={r['scale']}  {r['train_steps']} steps of {r['tokens_per_step']} tokens, "
        f"{r['rounds']} round(s)\n"
        f"  sparse {r['sparse_tokens_per_s']:8.0f} tokens/s\n"
        f"  dense  {r['dense_tokens_per_s']:8.0f} tokens/s\n"
        f"  sparse / dense: {r['ratio']:.2f}x  (per round, sparse / dense tokens/s: {per_round})",
        flush=True)


def main(argv):
  del argv
  if FLAGS.mode == "model":
    _model_mode()
    return
  _check_flags()
  tf.disable_v2_behavior()  # turns resource variables off: both layers get them back, as in training
  from st_moe import register  # pylint: disable=g-import-not-at-top
  register.use_resource_variables()
  tf.logging.set_verbosity(tf.logging.WARN)
  for e in FLAGS.experts:
    cfg = bench_layer.Config(int(e), FLAGS.d_model, FLAGS.hidden, FLAGS.batch_size, FLAGS.length,
                             FLAGS.group_size, FLAGS.capacity_factor_train, FLAGS.dtype,
                             FLAGS.dispatch, FLAGS.update)
    result, _ = bench_layer.run_config(cfg, FLAGS.impls, FLAGS.warmup, FLAGS.reps,
                                       check_agreement=FLAGS.check_agreement,
                                       profile=FLAGS.profile,
                                       inter_op_threads=FLAGS.inter_op_threads,
                                       router_on_bfloat16_grid=FLAGS.router_on_bfloat16_grid)
    if FLAGS.json:
      print(json.dumps(result), flush=True)
      continue
    line = f"experts={cfg.experts:3d}"
    for name in FLAGS.impls:
      line += (f"  {name}: {result[name + '_ms']:8.1f} ms/step "
               f"({100 * result[name + '_efficiency']:5.1f}% of matmul)")
    if "speedup" in result:
      line += f"  speedup {result['speedup']:.2f}x"
    if "max_abs_diff" in result:
      line += (f"  max|ours-upstream| {result['max_abs_diff']:.1e} (outputs up to "
               f"{result['output_max_abs']:.2g}); tokens off by >1%: "
               f"{100 * result['tokens_over_1pct']:.2f}%, >10%: "
               f"{100 * result['tokens_over_10pct']:.2f}%")
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
