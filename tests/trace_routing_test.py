"""tools/trace_routing.py on a tiny checkpoint: the model and lengths come from the model folder's
operative_config.gin, exactly --num_tokens encoder tokens are traced, tracing twice gives the
same routing.json, and --compare_checkpoint counts the tokens that keep their first expert.

The checkpoint is st_moe_tiny with 1 + 1 layers (random weights, no training: routing is what is
traced, not quality) at the embedded task's vocabulary, saved in-process as step 0, and as step 1
with its routers' kernels negated; operative_config.gin is
gin's operative config of that build plus the utils.run.sequence_length binding a
t5_mesh_transformer run records. The tool runs as a subprocess from another folder (the installed package, no
sys.path), ~30 s each on an idle machine. Before the tracer fixed the task's preprocessing seed and
the second-expert policy, the two traces differed (router entropy 1.38058 vs 1.38064 at layer 0).
"""
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import entry_point
import gin
import numpy as np

import graph_mode

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "trace_routing.py")
LENGTHS = {"inputs": 48, "targets": 12}
TASK = "st_moe_embedded_span_corruption"


def save_tiny_checkpoint(model_dir):
  """st_moe_tiny (1 + 1 layers) with random weights saved as model.ckpt-0, and its
  operative_config.gin."""
  import mesh_tensorflow as mtf  # pylint: disable=g-import-not-at-top
  from mesh_tensorflow.transformer import utils as mtf_utils  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  from st_moe.analysis import model_graph  # pylint: disable=g-import-not-at-top
  model_graph.parse_gin(["st_moe_tiny.gin", "cpu.gin"], list(entry_point.ONE_LAYER))
  vocab_size = seqio.get_mixture_or_task(TASK).output_features["inputs"].vocabulary.vocab_size
  with tf.Graph().as_default():
    mesh_shape, layout_rules = model_graph.gin_mesh_and_layout()
    model = mtf_utils.build_model(model_type="bitransformer", input_vocab_size=vocab_size,
                                  output_vocab_size=vocab_size, layout_rules=layout_rules,
                                  mesh_shape=mesh_shape)
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "my_mesh")
    feats = {}
    for key in ("inputs", "targets"):
      shape = mtf.Shape([mtf.Dimension("batch", 2), mtf.Dimension("length", LENGTHS[key])])
      feats[key] = mtf.import_fully_replicated(mesh, tf.ones(shape.to_integer_list, tf.int32),
                                               shape, name=key)
    model.call_simple(inputs=feats["inputs"], targets=feats["targets"], compute_loss=True,
                      mode="eval", variable_dtype=mtf_utils.get_variable_dtype())
    mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(mesh_shape, layout_rules, [""])
    mtf.Lowering(graph, {mesh: mesh_impl})
    tf.train.get_or_create_global_step()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      saver = tf.train.Saver()
      saver.save(sess, os.path.join(model_dir, "model.ckpt"), global_step=0)
      # Step 1: the same weights with every router kernel negated, so each token's first expert at
      # step 1 is the expert its router ranked last at step 0 (4 experts: never the same one).
      routers = [v for v in tf.global_variables() if v.name.endswith("router/kernel:0")]
      assert routers, [v.name for v in tf.global_variables()]
      sess.run([v.assign(-v) for v in routers])
      saver.save(sess, os.path.join(model_dir, "model.ckpt"), global_step=1)
  with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
    f.write(gin.operative_config_str())
    f.write(f"\nutils.run.sequence_length = {LENGTHS!r}\n")
  gin.clear_config()


def run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        timeout=600, cwd=tempfile.gettempdir(),
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


class TraceRoutingTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="st_moe_trace_")
    cls.model_dir = os.path.join(cls.tmp, "model")
    os.makedirs(cls.model_dir)
    save_tiny_checkpoint(cls.model_dir)

  def trace(self, out, *extra):
    proc = run_tool(f"--model_dir={self.model_dir}", f"--task={TASK}", "--num_tokens=100",
                    "--batch_size=2", "--capacity_factor_eval=0.5", f"--out={out}", *extra)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(out, "routing.json")) as f:
      return json.load(f)

  def test_config_from_model_dir_token_budget_and_same_result_twice(self):
    first = self.trace(os.path.join(self.tmp, "a"))
    second = self.trace(os.path.join(self.tmp, "b"))
    # 1 layer per stack, sparse -> 1 encoder + 1 decoder sparse layer.
    self.assertEqual([s["stack"] for s in first], ["encoder", "decoder"])
    for layer in first:
      self.assertEqual(layer["sequence_length"], LENGTHS, layer["name"])
      self.assertEqual(layer["num_experts"], 4)
    self.assertEqual(first[0]["num_tokens"], 100, first[0]["name"])
    self.assertEqual(first, second)
    for name in ("routing.md", "entropy.png", "layer_00_encoder_classes.png"):
      self.assertTrue(os.path.isfile(os.path.join(self.tmp, "a", name)), name)

  def test_compare_checkpoint_counts_tokens_keeping_their_first_expert(self):
    # The latest checkpoint (step 1) against step 0, whose routers rank the experts in reverse:
    # the encoder's sparse layer reads the same inputs at both (the routers are the only change
    # and it is the encoder's only sparse layer), so no token keeps its first expert. The
    # decoder's inputs change with the encoder's output: no exact expectation there.
    step0 = os.path.join(self.model_dir, "model.ckpt-0")
    out = self.trace(os.path.join(self.tmp, "compare"), f"--compare_checkpoint={step0}")
    self.assertEqual([s["compare_checkpoint"] for s in out], [step0, step0])
    self.assertEqual(out[0]["stack"], "encoder")
    self.assertEqual(out[0]["same_first_expert"], 0.0)
    with open(os.path.join(self.tmp, "compare", "routing.md")) as f:
      self.assertIn("same first expert %", f.read())

  def test_two_checkpoints_in_one_graph_trace_as_two_separate_traces(self):
    # The expected traces come from two separate single-checkpoint traces (a graph each); the
    # two-checkpoint trace builds the model once and must give the same arrays for both.
    from unittest import mock  # pylint: disable=g-import-not-at-top
    from mesh_tensorflow.transformer import utils as mtf_utils  # pylint: disable=g-import-not-at-top
    from st_moe.analysis import tracing  # pylint: disable=g-import-not-at-top
    step0 = os.path.join(self.model_dir, "model.ckpt-0")
    step1 = os.path.join(self.model_dir, "model.ckpt-1")
    kwargs = dict(num_tokens=20, batch_size=2)
    expected = []
    for path in (step1, step0):
      traces, _ = tracing.trace([], [], self.model_dir, TASK, checkpoint_path=path, **kwargs)
      gin.clear_config()
      expected.append(traces)
    with mock.patch.object(mtf_utils, "build_model", wraps=mtf_utils.build_model) as build:
      both, _ = tracing.trace_checkpoints([], [], self.model_dir, TASK, [step1, step0], **kwargs)
    gin.clear_config()
    self.assertEqual(build.call_count, 1)
    self.assertEqual(len(both), 2)
    for got, want in zip(both, expected):
      self.assertEqual([t.name for t in got], [t.name for t in want])
      for g, w in zip(got, want):
        for field in ("token_ids", "expert_index", "gates", "kept", "router_probs"):
          np.testing.assert_array_equal(getattr(g, field), getattr(w, field), err_msg=field)
    # The checkpoints differ (step 0's routers rank the experts in reverse), so a session that
    # failed to restore the second one would repeat the first one's routing.
    self.assertFalse(np.array_equal(both[0][0].expert_index, both[1][0].expert_index))

  def test_missing_compare_checkpoint_is_named_before_tracing(self):
    missing = os.path.join(self.model_dir, "model.ckpt-7")
    proc = run_tool(f"--model_dir={self.model_dir}", f"--compare_checkpoint={missing}")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(f"--compare_checkpoint={missing}: no such checkpoint", proc.stderr)

  def test_agreement_refuses_traces_of_other_layers_or_tokens(self):
    from st_moe.analysis import tracing  # pylint: disable=g-import-not-at-top

    def layer(name, tokens):
      n = len(tokens)
      return tracing.LayerTrace(
          name=name, stack="encoder", num_experts=2, token_ids=np.array(tokens),
          expert_index=np.zeros((n, 1), np.int32), gates=np.ones((n, 1), np.float32),
          kept=np.ones((n, 1), bool), router_probs=np.full((n, 2), 0.5, np.float32),
          layer_metrics={})

    a = [layer("encoder/block_000/moe", [5, 6, 7])]
    with self.assertRaisesRegex(ValueError, "has sparse layers .*decoder.*compare checkpoints of "
                                "the same model"):
      tracing.add_agreement([{}], a, [layer("decoder/block_000/moe", [5, 6, 7])], "ckpt-1")
    with self.assertRaisesRegex(ValueError, "read different tokens"):
      tracing.add_agreement([{}], a, [layer("encoder/block_000/moe", [5, 6, 8])], "ckpt-1")

  def test_one_expert_layer_is_reported_without_margin_or_entropy_chart(self):
    # A one-expert "sparse" layer (a dense FFN in the sparse layer's place, as a pilot's upper
    # bound) has no second choice and ln E = 0: no margin, no entropy ratio, and no crash.
    from st_moe.analysis import tracing  # pylint: disable=g-import-not-at-top
    from st_moe.tasks import corpus  # pylint: disable=g-import-not-at-top
    n = 5
    layer = tracing.LayerTrace(
        name="encoder/block_001/sparse_ffn", stack="encoder", num_experts=1,
        token_ids=np.arange(100, 100 + n), expert_index=np.zeros((n, 1), np.int32),
        gates=np.ones((n, 1), np.float32), kept=np.ones((n, 1), bool),
        router_probs=np.ones((n, 1), np.float32), layer_metrics={})
    summary = tracing.analyse(layer, corpus.docs_vocabulary())
    self.assertIsNone(summary["top2_log_margin_median"])
    self.assertEqual(summary["uniform_entropy"], 0.0)
    out = os.path.join(self.tmp, "one_expert")
    text = tracing.write_report([summary], out)
    self.assertIn("| encoder block_001 | 5 | 0 |  | 0 |  | 0 | 0 | 0 |", text)
    self.assertFalse(os.path.exists(os.path.join(out, "entropy.png")))

  def test_explicit_lengths_override_the_operative_config(self):
    from st_moe.analysis import tracing  # pylint: disable=g-import-not-at-top
    traces, _ = tracing.trace([], [], self.model_dir, TASK, num_tokens=20, batch_size=2,
                              sequence_length={"inputs": 32, "targets": 8})
    gin.clear_config()
    self.assertEqual(traces[0].sequence_length, {"inputs": 32, "targets": 8})
    self.assertEqual(traces[0].token_ids.shape, (20,))
    self.assertEqual(traces[0].router_probs.shape, (20, 4))

  def test_folder_without_config_or_gin_file_is_named(self):
    empty = os.path.join(self.tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    proc = run_tool(f"--model_dir={empty}")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(f"--model_dir={empty}: no operative_config.gin there", proc.stderr)


if __name__ == "__main__":
  absltest.main()
