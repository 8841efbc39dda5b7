"""SparseFFN on a mesh of 1 slice and of 8 slices (all on the CPU) gives the same results.

The batch (hence the routing groups) is split over a mesh dimension and the experts over the same
one (dispatch and combine are then all-to-alls) or over another. Same weights (copied from the
1-slice graph) and the same grouping (8 groups of 8 tokens on both meshes).
"""

from absl.testing import absltest
import mesh_tensorflow as mtf
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import layers
import graph_mode
import layer_harness


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

BATCH, LENGTH, D_MODEL = 8, 8, 8


def build_and_run(mesh_shape, layout, weights=None, num_experts=8, dispatch="einsum"):
  """One training step's forward and gradients; returns (results by name, weights by name)."""
  graph, mesh = layer_harness.new_graph(seed=7)
  x, batch_dim, length_dim, model_dim, variable_dtype = layer_harness.random_input(
      mesh, BATCH, LENGTH, D_MODEL)
  sequence_id = layer_harness.sequence_ids(mesh, batch_dim, length_dim, {2: 6})
  context = layer_harness.fake_context(mesh, batch_dim, length_dim, model_dim, variable_dtype,
                                       sequence_id=sequence_id, layout=layout,
                                       mesh_shape=mesh_shape)
  layer = layers.SparseFFN(num_experts=num_experts, hidden_size=6, group_size=8,
                           capacity_factor_train=1.0, second_policy_train="all",
                           multiplicative_bias=True, dispatch=dispatch)
  with tf.variable_scope("moe"):
    y = layer.call(context, x)
  loss = mtf.reduce_sum(mtf.square(y)) + mtf.add_n(context.losses)
  variables = graph.trainable_variables
  grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
  lowering = layer_harness.lower(graph, mesh, mesh_shape, layout)
  fetches = {"y": lowering.export_to_tf_tensor(y), "loss": lowering.export_to_tf_tensor(loss)}
  for v, g in zip(variables, grads):
    fetches["grad/" + v.name] = lowering.export_to_tf_tensor(g)
  masters = {v.name: v.get_master() for v in variables}
  assigns = [v.assign_to_master(tf.constant(weights[v.name])) for v in variables] if weights else []
  with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(assigns)
    sess.run(lowering.copy_masters_to_slices())
    return sess.run(fetches), sess.run(masters)


class MeshTest(absltest.TestCase):

  def _compare(self, mesh_shape, layout, dispatch="einsum"):
    one, weights = build_and_run("", "")
    many, _ = build_and_run(mesh_shape, layout, weights, dispatch=dispatch)
    self.assertEqual(set(one), set(many))
    self.assertIn("grad/moe/router/kernel", one)
    self.assertIn("grad/moe/multiplicative_bias", one)
    for key in one:
      np.testing.assert_allclose(many[key], one[key], atol=2e-5, rtol=1e-4,
                                 err_msg=f"{key} on {mesh_shape} / {layout}")
      self.assertTrue(np.all(np.isfinite(one[key])), key)
    self.assertGreater(np.abs(one["grad/moe/router/kernel"]).max(), 0.0)

  def test_experts_split_over_the_batch_mesh_dimension(self):
    self._compare("all:8", "batch:all;experts:all")

  def test_experts_split_over_another_mesh_dimension(self):
    self._compare("b:2;e:4", "batch:b;experts:e")

  def test_gather_dispatch_on_8_slices_matches_einsum_on_1(self):
    self._compare("all:8", "batch:all;experts:all", dispatch="gather")

  def test_experts_not_split(self):
    self._compare("all:8", "batch:all")

  def test_num_experts_not_divisible_by_mesh_dimension(self):
    with self.assertRaisesRegex(ValueError, r"num_experts=4 is not divisible by 8.*'experts'"):
      build_and_run("all:8", "batch:all;experts:all", num_experts=4)


if __name__ == "__main__":
  absltest.main()
