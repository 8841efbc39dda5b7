"""st_moe.MultiplierAdafactor: Adafactor whose learning rate is scaled for the variables a regex finds.

Expected values come from upstream mesh_tensorflow's AdafactorOptimizer, run on the same graph with
the scaled rate itself (a variable at rate 0.1 x 0.25 must change exactly as upstream's Adafactor
at rate 0.025 changes it, and an unmatched variable as upstream's at 0.1), and, for the patterns,
from the variable names SparseFFN creates (its experts' kernels and its router's).
"""
from absl.testing import absltest
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow import optimize
import numpy as np
import tensorflow.compat.v1 as tf

import graph_mode
from st_moe import optimizers

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

INIT = np.linspace(-1.0, 1.0, 128 * 128, dtype=np.float32).reshape(128, 128)
Y = np.cos(np.arange(128 * 128)).astype(np.float32).reshape(128, 128)
SCALE_INIT = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def _two_steps(make_optimizer):
  """{variable name: value after two Adafactor steps} of a graph with three variables.

  `experts/wi/kernel` and `dense/wi/kernel` ([128, 128]: factored slots) start equal and get equal
  gradients; `experts/scale` ([4]: an unfactored slot) a different one.
  """
  graph = tf.Graph()
  with graph.as_default():
    tf.train.get_or_create_global_step()
    mtf_graph = mtf.Graph()
    mesh = mtf.Mesh(mtf_graph, "mesh")
    a, b, d = mtf.Dimension("a", 128), mtf.Dimension("b", 128), mtf.Dimension("d", 4)
    experts = mtf.get_variable(mesh, "experts/wi/kernel", [a, b],
                               initializer=tf.constant_initializer(INIT))
    dense = mtf.get_variable(mesh, "dense/wi/kernel", [a, b],
                             initializer=tf.constant_initializer(INIT))
    scale = mtf.get_variable(mesh, "experts/scale", [d],
                             initializer=tf.constant_initializer(SCALE_INIT))
    y = mtf.import_tf_tensor(mesh, tf.constant(Y), [a, b])
    loss = (mtf.reduce_sum(experts * y) + mtf.reduce_sum(dense * y)
            + mtf.reduce_sum(mtf.square(scale)))
    variables = mtf_graph.trainable_variables
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    ops = make_optimizer().apply_grads(grads, variables)
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(mtf.convert_to_shape("x:1"),
                                                     mtf.convert_to_layout_rules(""), [""])
    lowering = mtf.Lowering(mtf_graph, {mesh: impl}, autostack=True)
    train_op = tf.group([lowering.lowered_operation(op) for op in ops])
    restore = lowering.copy_masters_to_slices()
    to_masters = lowering.copy_slices_to_masters()
    state = {v.op.name: v for v in tf.global_variables() if v.op.name != "global_step"}
    with tf.Session(graph=graph) as session:
      session.run(tf.global_variables_initializer())
      session.run(restore)
      session.run(train_op)
      session.run(train_op)
      session.run(to_masters)
      return session.run(state)


def _upstream(learning_rate):
  return lambda: optimize.AdafactorOptimizer(learning_rate=learning_rate, decay_rate=0.8)


class MultiplierAdafactorTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_matched_variables_step_as_upstream_at_the_scaled_rate(self):
    ours = _two_steps(lambda: optimizers.MultiplierAdafactor(
        learning_rate=0.1, decay_rate=0.8, learning_rate_multipliers={"^experts/": 0.25}))
    at_full_rate = _two_steps(_upstream(0.1))
    at_quarter_rate = _two_steps(_upstream(0.025))
    for name in ("experts/wi/kernel", "experts/wi/kernel_slot_vr", "experts/wi/kernel_slot_vc",
                 "experts/scale", "experts/scale_slot_v"):
      np.testing.assert_allclose(ours[name], at_quarter_rate[name], rtol=1e-6, atol=1e-7,
                                 err_msg=name)
    for name in ("dense/wi/kernel", "dense/wi/kernel_slot_vr", "dense/wi/kernel_slot_vc"):
      np.testing.assert_allclose(ours[name], at_full_rate[name], rtol=1e-6, atol=1e-7,
                                 err_msg=name)
    # The two kernels started equal and had equal gradients: only the rate set them apart, and the
    # quarter-rate kernel moved a quarter as far (Adafactor's step is linear in the rate while the
    # parameter scale, read before each step, barely changes).
    moved_experts = np.abs(ours["experts/wi/kernel"] - INIT).mean()
    moved_dense = np.abs(ours["dense/wi/kernel"] - INIT).mean()
    self.assertGreater(moved_dense, 1e-3)
    self.assertAlmostEqual(moved_experts / moved_dense, 0.25, delta=0.01)

  def test_no_multipliers_is_upstream_adafactor(self):
    ours = _two_steps(lambda: optimizers.MultiplierAdafactor(learning_rate=0.1, decay_rate=0.8))
    upstream = _two_steps(_upstream(0.1))
    self.assertEqual(sorted(ours), sorted(upstream))
    for name in upstream:
      self.assertEqual(ours[name].tobytes(), upstream[name].tobytes(), name)

  def test_documented_pattern_finds_the_experts_not_the_router(self):
    opt = optimizers.MultiplierAdafactor(
        learning_rate=0.01, learning_rate_multipliers={"SparseFFN/(wi|wo)": 0.3})
    # Names as SparseFFN creates them (tests/layers_test.py and the checkpoints list them).
    for name in ("encoder/block_001/sparse_ffn/SparseFFN/wi_0/kernel",
                 "encoder/block_001/sparse_ffn/SparseFFN/wi_1/kernel",
                 "decoder/block_003/sparse_ffn/SparseFFN/wo/kernel"):
      self.assertEqual(opt.multiplier(name), 0.3, name)
    for name in ("encoder/block_001/sparse_ffn/SparseFFN/router/kernel",
                 "encoder/block_000/dense_ffn/DenseReluDense/wi_0/kernel",
                 "shared/embedding"):
      self.assertEqual(opt.multiplier(name), 1.0, name)

  def test_first_matching_pattern_wins(self):
    opt = optimizers.MultiplierAdafactor(
        learning_rate=0.01, learning_rate_multipliers={"wo/": 0.5, "SparseFFN/": 0.2})
    self.assertEqual(opt.multiplier("x/SparseFFN/wo/kernel"), 0.5)
    self.assertEqual(opt.multiplier("x/SparseFFN/wi_0/kernel"), 0.2)

  def test_adafactor_bindings_still_apply(self):
    gin.parse_config("""
        import st_moe.optimizers
        AdafactorOptimizer.beta1 = 0.9
        AdafactorOptimizer.clipping_threshold = 2.0
        st_moe.MultiplierAdafactor.learning_rate_multipliers = {"SparseFFN/(wi|wo)": 0.3}
    """)
    opt = optimizers.MultiplierAdafactor(learning_rate=0.01)
    self.assertEqual(opt._beta1, 0.9)  # pylint: disable=protected-access
    self.assertEqual(opt._clipping_threshold, 2.0)  # pylint: disable=protected-access
    self.assertEqual(opt.multiplier("e/SparseFFN/wo/kernel"), 0.3)

  def test_bad_multipliers_are_named(self):
    cases = [
        ([("SparseFFN", 0.3)], r"learning_rate_multipliers = \[.*must be a dict"),
        ({"SparseFFN/wi": 0.0}, r"'SparseFFN/wi': 0.0 must be a number > 0"),
        ({"SparseFFN/wi": -1}, r"'SparseFFN/wi': -1 must be a number > 0"),
        ({"SparseFFN/wi": True}, r"'SparseFFN/wi': True must be a number > 0"),
        ({"SparseFFN/(wi": 0.3}, r"key 'SparseFFN/\(wi' is not a regular expression"),
        ({"": 0.3}, r"key '' must be a non-empty regular expression"),
    ]
    for value, message in cases:
      with self.assertRaisesRegex(ValueError, message, msg=repr(value)):
        optimizers.MultiplierAdafactor(learning_rate=0.01, learning_rate_multipliers=value)


if __name__ == "__main__":
  absltest.main()
