"""Dense-sparse stacking: pinned sparse indices, names, gin scoping, a tiny model that trains."""
from absl.testing import absltest
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import moe as upstream_moe
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import transformer_layers
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import register  # pylint: disable=unused-import  (registers the st_moe.* gin names)
from st_moe import layers
from st_moe import stacking
import graph_mode


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

TINY_GIN = """
SelfAttention.num_heads = 2
SelfAttention.key_value_size = 8
EncDecAttention.num_heads = 2
EncDecAttention.key_value_size = 8
DenseReluDense.hidden_size = 24
DenseReluDense.activation = ["gelu", "linear"]
st_moe.SparseFFN.num_experts = 4
st_moe.SparseFFN.hidden_size = 24
st_moe.SparseFFN.group_size = 32
encoder/st_moe.{fn}.num_layers = 4
encoder/st_moe.{fn}.num_sparse_layers = 2
decoder/st_moe.{fn}.num_layers = 2
decoder/st_moe.{fn}.num_sparse_layers = 1
decoder/st_moe.{fn}.decoder = True
decoder/st_moe.SparseFFN.num_experts = 2
"""
# What t5_mesh_transformer builds: transformer.make_bitransformer -> make_layer_stack.
MAKE_BITRANSFORMER_GIN = """
transformer.LayerStack.sublayers_initial = [@transformer.sublayer_dropout]
transformer.LayerStack.sublayers_per_layer = [@transformer.sublayer_rms_norm,
    @transformer.sublayer_call_layer, @transformer.sublayer_dropout,
    @transformer.sublayer_residual]
transformer.LayerStack.sublayers_final = [@transformer.sublayer_rms_norm,
    @transformer.sublayer_dropout]
encoder/transformer.make_layer_stack.layers = @encoder/st_moe.sparse_layer_specs()
decoder/transformer.make_layer_stack.layers = @decoder/st_moe.sparse_layer_specs()
transformer.make_layer_stack.num_layers = 1
transformer.make_layer_stack.block_scope = False
Unitransformer.d_model = 16
Unitransformer.max_length = 8
"""


class SparseLayerIndicesTest(absltest.TestCase):

  def test_pinned_indices(self):
    indices = stacking.sparse_layer_indices
    # ST-MoE: 24 layers, 6 sparse: 1-indexed 4, 8, ..., 24.
    self.assertEqual(indices(24, 6, "every_nth"), [3, 7, 11, 15, 19, 23])
    self.assertEqual(indices(12, 3, "every_nth"), [3, 7, 11])
    self.assertEqual(indices(4, 4, "every_nth"), [0, 1, 2, 3])
    self.assertEqual(indices(24, 6, "bottom"), [0, 1, 2, 3, 4, 5])
    self.assertEqual(indices(24, 6, "top"), [18, 19, 20, 21, 22, 23])
    self.assertEqual(indices(24, 6, "middle"), [9, 10, 11, 12, 13, 14])
    self.assertEqual(indices(5, 2, "middle"), [1, 2])
    self.assertEqual(indices(6, 1, "middle"), [2])
    for placement in stacking.PLACEMENTS:
      self.assertEqual(indices(6, 0, placement), [])

  def test_invalid(self):
    with self.assertRaisesRegex(ValueError, "sparse_placement='mixed'"):
      stacking.sparse_layer_indices(24, 6, "mixed")
    with self.assertRaisesRegex(ValueError,
                                "num_layers=10 to be a multiple of num_sparse_layers=4"):
      stacking.sparse_layer_indices(10, 4, "every_nth")
    with self.assertRaisesRegex(ValueError, "num_sparse_layers=7"):
      stacking.sparse_layer_indices(6, 7, "top")
    with self.assertRaisesRegex(ValueError, "extra_dense_ffn='later'"):
      stacking.block_layers(4, 1, extra_dense_ffn="later")


class SparseLayerStackTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    gin.clear_config()
    tf.reset_default_graph()

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_layer_names_and_kinds(self):
    stack = stacking.sparse_layer_stack(num_layers=4, num_sparse_layers=2)
    self.assertEqual([l.name for l in stack.layers], [
        "block_000/self_attention", "block_000/dense_ffn",
        "block_001/self_attention", "block_001/sparse_ffn", "block_001/extra_dense_ffn_after",
        "block_002/self_attention", "block_002/dense_ffn",
        "block_003/self_attention", "block_003/sparse_ffn", "block_003/extra_dense_ffn_after"])
    kinds = [type(l) for l in stack.layers]
    self.assertEqual(kinds.count(layers.SparseFFN), 2)
    self.assertEqual(kinds.count(transformer_layers.DenseReluDense), 4)
    decoder = stacking.sparse_layer_stack(num_layers=2, num_sparse_layers=1, decoder=True,
                                          extra_dense_ffn="both")
    self.assertEqual([l.name for l in decoder.layers], [
        "block_000/self_attention", "block_000/enc_dec_attention", "block_000/dense_ffn",
        "block_001/self_attention", "block_001/enc_dec_attention",
        "block_001/extra_dense_ffn_before", "block_001/sparse_ffn",
        "block_001/extra_dense_ffn_after"])
    none = stacking.sparse_layer_stack(num_layers=2, num_sparse_layers=1, extra_dense_ffn="none")
    self.assertEqual([l.name for l in none.layers][-2:],
                     ["block_001/self_attention", "block_001/sparse_ffn"])

  def test_random_extra_dense_ffns(self):
    # 4 blocks, 2 sparse (1-indexed 2 and 4): 8 plain sub-layers, 2 extra dense FFNs after the
    # sub-layers numpy's RandomState(0) draws from range(8) without replacement.
    want_after = set(np.random.RandomState(0).choice(8, size=2, replace=False).tolist())
    plain = [name for _, name in stacking.block_specs(4, 2, extra_dense_ffn="none")]
    names = [name for _, name in stacking.block_specs(4, 2, extra_dense_ffn="random")]
    extra = [i for i, n in enumerate(names) if "extra_dense_ffn" in n]
    self.assertLen(extra, 2)
    self.assertEqual([n for n in names if "extra_dense_ffn" not in n], plain)
    for i in extra:  # each follows the sub-layer it is named after
      block, sublayer = names[i - 1].split("/", 1)
      self.assertEqual(names[i], f"{block}/extra_dense_ffn_after_{sublayer}")
    self.assertEqual({plain.index(names[i - 1]) for i in extra}, want_after)
    # The same stack every time (a checkpoint must find its variables).
    self.assertEqual(names, [n for _, n in stacking.block_specs(4, 2, extra_dense_ffn="random")])

  def test_gin_scopes_and_upstream_swap(self):
    gin.parse_config(TINY_GIN.format(fn="sparse_layer_stack") + """
encoder/st_moe.sparse_layer_stack.sparse_ffn_layer = @moe.MoE1D
encoder/MoE1D.num_experts = 8
""")
    with gin.config_scope("encoder"):
      encoder = stacking.sparse_layer_stack()
    with gin.config_scope("decoder"):
      decoder = stacking.sparse_layer_stack()
    encoder_sparse = [l for l in encoder.layers if l.name.endswith("sparse_ffn")]
    decoder_sparse = [l for l in decoder.layers if l.name.endswith("sparse_ffn")]
    self.assertLen(encoder_sparse, 2)
    self.assertTrue(all(isinstance(l, upstream_moe.MoE1D) for l in encoder_sparse))
    hparams = encoder_sparse[0]._hparams  # pylint: disable=protected-access
    self.assertEqual(hparams.moe_num_experts, 8)
    self.assertLen(decoder_sparse, 1)
    self.assertIsInstance(decoder_sparse[0], layers.SparseFFN)
    self.assertEqual(decoder_sparse[0].num_experts, 2)  # decoder/ binding
    self.assertEqual(decoder_sparse[0].hidden_size, 24)
    self.assertEqual(len(decoder.layers), 2 * 3 + 1)

  def test_batch_prioritized_routing_in_decoder_stack_raises(self):
    gin.parse_config("st_moe.SparseFFN.batch_prioritized_routing = True")
    stacking.sparse_layer_stack(num_layers=2, num_sparse_layers=1)  # encoder: fine
    with self.assertRaisesRegex(ValueError, "batch_prioritized_routing=True in a decoder"):
      stacking.sparse_layer_stack(num_layers=2, num_sparse_layers=1, decoder=True)

  def test_specs_and_stack_give_the_same_layers(self):
    gin.parse_config(TINY_GIN.format(fn="sparse_layer_specs") + MAKE_BITRANSFORMER_GIN)
    with gin.config_scope("decoder"):
      stack = transformer.make_layer_stack()
    direct = stacking.sparse_layer_stack(num_layers=2, num_sparse_layers=1, decoder=True)
    self.assertEqual([l.name for l in stack.layers], [l.name for l in direct.layers])
    self.assertEqual([type(l) for l in stack.layers], [type(l) for l in direct.layers])
    self.assertEqual(stack.layers[-2].num_experts, 2)  # decoder/ binding applied

  def test_tiny_bitransformer_trains(self):
    """A tiny ST-MoE encoder-decoder built as t5_mesh_transformer builds it trains on 2 slices."""
    gin.parse_config(TINY_GIN.format(fn="sparse_layer_specs") + MAKE_BITRANSFORMER_GIN)
    batch, length, vocab = 4, 8, 16
    mesh_shape, layout = "all:2", "batch:all;experts:all"
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    model = transformer.make_bitransformer(input_vocab_size=vocab, output_vocab_size=vocab,
                                           layout=layout, mesh_shape=mesh_shape)
    batch_dim, length_dim = mtf.Dimension("batch", batch), mtf.Dimension("length", length)
    rng = np.random.RandomState(0)
    ids = rng.randint(2, vocab, size=(batch, length)).astype(np.int32)
    inputs = mtf.import_tf_tensor(mesh, tf.constant(ids), mtf.Shape([batch_dim, length_dim]))
    targets = mtf.import_tf_tensor(mesh, tf.constant(ids[:, ::-1].copy()),
                                   mtf.Shape([batch_dim, length_dim]))
    sequence_id = mtf.ones(mesh, mtf.Shape([batch_dim, length_dim]), tf.int32)
    _, loss = model.call_simple(inputs, targets, compute_loss=True, mode="train",
                                encoder_sequence_id=sequence_id,
                                decoder_sequence_id=sequence_id)
    variables = graph.trainable_variables
    names = [v.name for v in variables]
    self.assertIn("encoder/block_001/sparse_ffn/SparseFFN/router/kernel", names)
    self.assertIn("decoder/block_001/sparse_ffn/SparseFFN/wi_0/kernel", names)
    self.assertIn("encoder/block_001/extra_dense_ffn_after/DenseReluDense/wi_0/kernel", names)
    self.assertLen(layers.routing_records(graph), 3)
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    update_ops = mtf.optimize.AdafactorOptimizer(learning_rate=0.05).apply_grads(grads, variables)
    mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(
        shape=mesh_shape, layout=layout, devices=["", ""])
    lowering = mtf.Lowering(graph, {mesh: mesh_impl})
    tf_loss = lowering.export_to_tf_tensor(loss)
    summaries = [n for n, _ in tf.get_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY)]
    self.assertIn("encoder/block_003/sparse_ffn/SparseFFN/router/z_loss", summaries)
    self.assertIn("decoder/block_001/sparse_ffn/SparseFFN/router/fraction_dropped", summaries)
    watched = [n for n in names if "sparse_ffn" in n or "extra_dense_ffn" in n]
    tf_grads = {n: lowering.export_to_tf_tensor(g) for n, g in zip(names, grads) if n in watched}
    train_op = tf.group([lowering.lowered_operation(op) for op in update_ops])
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(lowering.copy_masters_to_slices())
      first_grads = sess.run(tf_grads)
      losses = [sess.run([tf_loss, train_op])[0] for _ in range(12)]
    for n, g in first_grads.items():
      self.assertTrue(np.all(np.isfinite(g)), n)
      self.assertGreater(np.abs(g).max(), 0.0, n)
    self.assertTrue(np.all(np.isfinite(losses)), losses)
    self.assertLess(losses[-1], 0.8 * losses[0], losses)


if __name__ == "__main__":
  absltest.main()
