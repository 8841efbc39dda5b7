"""SparseFFN's settings: checked once at construction, named errors; the decoding capacity.

The routing functions (st_moe.routing) trust the layer, so every bad setting must be refused by
`SparseFFN(...)` itself, before a graph is built or a step runs. The decoding capacity: a decoding
step (context mode "incremental") routes one position per sequence; with the default
capacity_factor_decode=None no token of it is dropped even when every token picks the same
expert, while a capacity factor at the same step drops what its buffer cannot hold.
"""
import types

from absl.testing import absltest
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import layers
import graph_mode


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

D_MODEL, EXPERTS = 6, 4


class SettingsTest(absltest.TestCase):

  def test_bad_settings_are_named_at_construction(self):
    cases = [
        (dict(hidden_size=0), r"hidden_size=0: .*integer >= 1"),
        (dict(hidden_size=-3), r"hidden_size=-3"),
        (dict(hidden_size=2.5), r"hidden_size=2\.5"),
        (dict(second_threshold_train=-0.5),
         r"second_threshold_train=-0\.5 with the 'random' second-expert policy.*\(0, 1\]"),
        (dict(second_threshold_train=1.5), r"second_threshold_train=1\.5 .*\(0, 1\]"),
        (dict(second_threshold_train=0.0), r"second_threshold_train=0\.0"),
        (dict(second_policy_eval="threshold", second_threshold_eval=1.5),
         r"second_threshold_eval=1\.5 with the 'threshold' second-expert policy"),
        (dict(second_policy_eval="random", second_threshold_eval=-0.1),
         r"second_threshold_eval=-0\.1 with the 'random'"),
        (dict(group_size=8, min_expert_capacity=9),
         r"min_expert_capacity=9 is larger than group_size=8.*min_expert_capacity <= 8"),
        (dict(capacity_factor_decode=0.0), r"capacity_factor_decode=0\.0: must be > 0, or None"),
        (dict(capacity_factor_decode=-2), r"capacity_factor_decode=-2"),
        (dict(router_precision="float16"),
         r"router_precision='float16': must be one of 'float32', 'bfloat16'"),
    ]
    for kwargs, message in cases:
      with self.assertRaisesRegex(ValueError, message, msg=str(kwargs)):
        layers.SparseFFN(**kwargs)

  def test_limits_that_work(self):
    # The edges of the allowed ranges, and thresholds that the all/none policies ignore.
    layers.SparseFFN(hidden_size=1, second_threshold_train=1.0, second_threshold_eval=1e-6,
                     second_policy_eval="threshold")
    layers.SparseFFN(group_size=8, min_expert_capacity=8)
    layers.SparseFFN(second_policy_train="all", second_threshold_train=1.5,
                     second_policy_eval="none", second_threshold_eval=-1.0)
    layers.SparseFFN(capacity_factor_decode=0.5)
    layers.SparseFFN(router_precision="bfloat16")

  def test_defaults_train_at_random_and_evaluate_deterministically(self):
    layer = layers.SparseFFN()
    self.assertEqual(layer.second_policy_train, "random")
    self.assertEqual(layer.second_policy_eval, "all")
    self.assertIsNone(layer.capacity_factor_decode)

  def test_capacity_per_mode(self):
    layer = layers.SparseFFN(num_experts=32, group_size=1024)
    # By hand: max(min(S, int(S * cf / E)), 4).
    self.assertEqual(layer.capacity(1024, train=True), 40)  # 1024 * 1.25 / 32
    self.assertEqual(layer.capacity(1024, train=False), 64)  # 1024 * 2.0 / 32
    self.assertEqual(layer.capacity(256, train=False, decoding=True), 256)  # None: all of S
    layer = layers.SparseFFN(num_experts=32, group_size=1024, capacity_factor_decode=2.0)
    self.assertEqual(layer.capacity(256, train=False, decoding=True), 16)  # 256 * 2 / 32


def decoding_step(layer, batch):
  """One incremental-decoding call of `layer` in which every token prefers expert 0.

  Returns (kept <float32>[batch, 1, K], fraction_dropped) as numpy values.
  """
  tf.reset_default_graph()
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  batch_dim, length_dim = mtf.Dimension("batch", batch), mtf.Dimension("length", 8)
  model_dim = mtf.Dimension("d_model", D_MODEL)
  variable_dtype = mtf.VariableDType(tf.float32, tf.float32, tf.float32)
  # Every token is all ones, so every token has the same router logits: all go to one expert.
  x = mtf.ones(mesh, mtf.Shape([batch_dim, model_dim]))  # one position per sequence
  model = types.SimpleNamespace(ensemble_dim=None, model_dim=model_dim, layout=None,
                                mesh_shape=None, autoregressive=True)
  context = transformer.Context(model=model, mesh=mesh, batch_dims=[batch_dim],
                                length_dim=length_dim, variable_dtype=variable_dtype,
                                mode="incremental", losses=None)
  with tf.variable_scope("moe"):
    layer.call(context, x)
  record, = layers.routing_records(graph)
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
  lowering = mtf.Lowering(graph, {mesh: mesh_impl})
  fetch = [lowering.export_to_tf_tensor(record.kept),
           lowering.export_to_tf_tensor(record.metrics["fraction_dropped"]),
           lowering.export_to_tf_tensor(record.expert_index)]
  with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(lowering.copy_masters_to_slices())
    kept, dropped, index = sess.run(fetch)
  assert len(set(index[..., 0].reshape(-1))) == 1, index  # the premise: one expert for all
  return kept, dropped


class DecodingCapacityTest(absltest.TestCase):

  def test_default_decoding_step_drops_nothing_a_factor_does(self):
    batch = 32  # tokens of the decoding step, one group
    kept, dropped = decoding_step(
        layers.SparseFFN(num_experts=EXPERTS, hidden_size=4, group_size=64), batch)
    np.testing.assert_array_equal(kept, 1.0)  # both choices of all 32 tokens
    self.assertEqual(dropped, 0.0)
    # A decoding capacity factor at the same step: C = max(min(32, int(32 * 1.0 / 4)), 4) = 8
    # slots per expert. All 32 first choices go to one expert A, all second choices to one
    # expert B; slots go in token order, so tokens 0-7 keep both choices and tokens 8-31 are
    # dropped entirely: 24 / 32.
    kept, dropped = decoding_step(
        layers.SparseFFN(num_experts=EXPERTS, hidden_size=4, group_size=64,
                         capacity_factor_decode=1.0), batch)
    self.assertEqual(kept[..., 0].sum(), 8)  # first expert: its 8 slots
    self.assertEqual(kept[..., 1].sum(), 8)  # second expert: its 8 slots
    np.testing.assert_array_equal(kept[:8], 1.0)
    self.assertAlmostEqual(float(dropped), 24 / 32, places=6)


if __name__ == "__main__":
  absltest.main()
