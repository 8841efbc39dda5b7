"""st_moe.layers.SparseFFN: numpy oracle of the whole layer, gradients, dtypes, losses, errors."""
from unittest import mock

from absl.testing import absltest
import mesh_tensorflow as mtf
import numpy as np
from scipy import special
import tensorflow.compat.v1 as tf

from st_moe import layers
from st_moe import routing
import graph_mode
import layer_harness


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

BATCH, LENGTH, D_MODEL = 2, 8, 6


def build(layer, mode="train", activation_dtype=tf.float32, padded=True, autoregressive=False):
  """Calls `layer` on a random input (row 1 padded from 6); returns (graph, mesh, x, y, context)."""
  b = layer_harness.build(layer, BATCH, LENGTH, D_MODEL, mode=mode,
                          activation_dtype=activation_dtype, padding={1: 6} if padded else None,
                          autoregressive=autoregressive)
  return b.graph, b.mesh, b.x, b.y, b.context


run = layer_harness.run


def gelu(x):
  """The tanh approximation of GELU (Hendrycks and Gimpel, arXiv 1606.08415), as mtf.gelu."""
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_layer(x, nonpadding, w, experts, k, capacity, bias=None, add_bias=None):
  """numpy: the sparse FFN of one group (S = all tokens) with second policy 'all'."""
  tokens = x.reshape(-1, x.shape[-1])
  mask = nonpadding.reshape(-1)
  logits = tokens @ w["router/kernel"]
  probs = special.softmax(logits, axis=-1)
  out = np.zeros_like(tokens)
  taken = np.zeros(experts, int)
  choices = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  gates = np.take_along_axis(probs, choices, -1) * mask[:, None]
  gates /= gates.sum(-1, keepdims=True) + 1e-9
  for i in range(k):
    for s in range(len(tokens)):
      e = choices[s, i]
      if not mask[s] or taken[e] >= capacity:
        continue
      taken[e] += 1
      h = gelu(tokens[s] @ w["wi_0/kernel"][e]) * (tokens[s] @ w["wi_1/kernel"][e])
      if bias is not None:
        h *= bias[e]
      if add_bias is not None:
        h += add_bias[e]
      out[s] += gates[s, i] * (h @ w["wo/kernel"][e])
  return out.reshape(x.shape)


class SparseFFNTest(absltest.TestCase):

  def test_matches_numpy_layer_and_gradients_reach_every_weight(self):
    for dispatch in ("einsum", "gather"):
      with self.subTest(dispatch=dispatch):
        self._check_against_numpy(dispatch)

  def test_additive_bias_matches_numpy(self):
    for dispatch in ("einsum", "gather"):
      with self.subTest(dispatch=dispatch):
        layer = layers.SparseFFN(num_experts=4, hidden_size=5, group_size=16,
                                 num_selected_experts=2, capacity_factor_train=1.0,
                                 second_policy_train="all", additive_bias=True, dispatch=dispatch)
        graph, mesh, x, y, context = build(layer)
        variables = graph.trainable_variables
        names = [v.name for v in variables]
        self.assertIn("moe/additive_bias", names)
        self.assertNotIn("moe/multiplicative_bias", names)
        bias_var, = [v for v in variables if v.name == "moe/additive_bias"]
        self.assertEqual(run(graph, mesh, {"b": bias_var})["b"].tolist(),
                         np.zeros((4, 5)).tolist())
        bias = np.random.RandomState(6).uniform(-1.0, 1.0, (4, 5)).astype(np.float32)
        fetch = {"y": y, "x": x}
        fetch.update({"w/" + n: v for n, v in zip(names, variables)})
        out = run(graph, mesh, fetch, assign={bias_var: bias})
        w = {n[len("w/moe/"):]: v for n, v in out.items() if n.startswith("w/moe/")}
        nonpadding = np.ones((BATCH, LENGTH))
        nonpadding[1, 6:] = 0
        want = reference_layer(out["x"], nonpadding, w, 4, 2, 4, add_bias=bias)
        np.testing.assert_allclose(out["y"], want, atol=1e-5)
        # Without the bias term the oracle differs: the test sees it.
        self.assertGreater(np.abs(reference_layer(out["x"], nonpadding, w, 4, 2, 4)
                                  - out["y"]).max(), 1e-3)
        self.assertEqual(np.abs(out["y"][1, 6:]).max(), 0.0)  # padding: routed nowhere

  def _check_against_numpy(self, dispatch):
    layer = layers.SparseFFN(num_experts=4, hidden_size=5, group_size=16, num_selected_experts=2,
                             capacity_factor_train=1.0, second_policy_train="all",
                             multiplicative_bias=True, dispatch=dispatch)
    graph, mesh, x, y, context = build(layer)
    loss = mtf.reduce_sum(mtf.square(y)) + mtf.add_n(context.losses)
    variables = graph.trainable_variables
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    names = [v.name for v in variables]
    self.assertCountEqual(names, ["x", "moe/router/kernel", "moe/wi_0/kernel", "moe/wi_1/kernel",
                                  "moe/multiplicative_bias", "moe/wo/kernel"])
    fetch = {"y": y, "x": x}
    fetch.update({"grad/" + n: g for n, g in zip(names, grads)})
    fetch.update({"w/" + n: v for n, v in zip(names, variables)})
    bias_var, = [v for v in variables if v.name == "moe/multiplicative_bias"]
    self.assertEqual(run(graph, mesh, {"b": bias_var})["b"].tolist(), np.ones((4, 5)).tolist())
    # A bias away from its initial ones, so that the oracle checks it multiplies the hidden layer.
    bias = np.random.RandomState(5).uniform(0.5, 1.5, (4, 5)).astype(np.float32)
    out = run(graph, mesh, fetch, assign={bias_var: bias})
    w = {n[len("w/moe/"):]: v for n, v in out.items() if n.startswith("w/moe/")}
    np.testing.assert_array_equal(w["multiplicative_bias"], bias)
    nonpadding = np.ones((BATCH, LENGTH))
    nonpadding[1, 6:] = 0
    # 16 tokens, one group; capacity int(16 * 1.0 / 4) = 4 slots for 2 * 14 choices.
    want = reference_layer(out["x"], nonpadding, w, 4, 2, 4, bias=w["multiplicative_bias"])
    np.testing.assert_allclose(out["y"], want, atol=1e-5)
    self.assertEqual(np.abs(out["y"][1, 6:]).max(), 0.0)  # padding: routed nowhere
    for n in names:
      g = out["grad/" + n]
      self.assertTrue(np.all(np.isfinite(g)), n)
      self.assertGreater(np.abs(g).max(), 0.0, n)

  def test_bfloat16_activations_keep_router_float32(self):
    seen = {}
    real = routing.route_top_k

    def spy(logits, *args, **kwargs):
      seen["logits"] = logits
      return real(logits, *args, **kwargs)

    layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8)
    with mock.patch.object(routing, "route_top_k", side_effect=spy):
      graph, mesh, _, y, context = build(layer, activation_dtype=tf.bfloat16)
    self.assertEqual(seen["logits"].dtype, tf.float32)
    self.assertEqual(y.dtype, tf.bfloat16)
    # Loss entries in the activation dtype, as mesh's own (the model sums them with mtf.add_n).
    self.assertEqual([l.dtype for l in context.losses], [tf.bfloat16, tf.bfloat16])
    router, = [v for v in graph.trainable_variables if v.name == "moe/router/kernel"]
    self.assertEqual(router.activation_dtype, tf.float32)
    loss = mtf.reduce_sum(mtf.square(mtf.cast(y, tf.float32))) + mtf.add_n(
        [mtf.cast(l, tf.float32) for l in context.losses])
    grad, = mtf.gradients([loss], [router.outputs[0]])
    out = run(graph, mesh, {"g": grad, "y": y})
    self.assertTrue(np.all(np.isfinite(out["g"])))
    self.assertGreater(np.abs(out["g"]).max(), 0.0)

  def test_one_context_loss_per_coefficient(self):
    for coefs, count in (((1e-2, 1e-3), 2), ((0.0, 1e-3), 1), ((1e-2, 0.0), 1), ((0.0, 0.0), 0)):
      layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8,
                               balance_loss_coef=coefs[0], router_z_loss_coef=coefs[1])
      _, _, _, _, context = build(layer)
      self.assertLen(context.losses, count, coefs)
    layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8, balance_loss_coef=0.5,
                             router_z_loss_coef=0.25)
    graph, mesh, x, _, context = build(layer, padded=False)  # z-loss without a padding mask
    router, = [v for v in graph.trainable_variables if v.name == "moe/router/kernel"]
    out = run(graph, mesh, {"balance": context.losses[0], "z": context.losses[1], "x": x,
                            "router": router})
    # numpy reference (paper eq. 4 and 5): 16 tokens in 2 groups of 8 (one per sequence);
    # balance = mean over groups of E * sum_e f_e P_e, z = mean over tokens of logsumexp^2.
    logits = out["x"].astype(np.float64) @ out["router"].astype(np.float64)  # [2, 8, 4]
    probs = special.softmax(logits, axis=-1)
    fractions = np.eye(4)[probs.argmax(-1)].mean(1)  # [2, 4] share of top-1 choices per group
    balance = np.mean(4 * (fractions * probs.mean(1)).sum(-1))
    z = np.mean(special.logsumexp(logits, axis=-1) ** 2)
    self.assertAlmostEqual(out["balance"], 0.5 * balance, places=5)
    self.assertAlmostEqual(out["z"], 0.25 * z, places=5)

  def test_routing_records(self):
    layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8, num_selected_experts=3,
                             second_policy_train="all", capacity_factor_train=4.0)
    graph, mesh, _, _, _ = build(layer)
    record, = layers.routing_records(graph)
    self.assertEqual(record.name, "moe")
    self.assertEqual([d.size for d in record.expert_index.shape.dims], [BATCH, LENGTH, 3])
    self.assertEqual(record.expert_index.dtype, tf.int32)
    self.assertEqual([d.size for d in record.router_probs.shape.dims], [BATCH, LENGTH, 4])
    self.assertIn("z_loss", record.metrics)
    self.assertIn("expert_fraction/03", record.metrics)
    out = run(graph, mesh, {"index": record.expert_index, "gates": record.gates,
                            "kept": record.kept, "probs": record.router_probs,
                            "dropped": record.metrics["fraction_dropped"]})
    # The chosen experts are the three most probable ones.
    top3 = np.argsort(-out["probs"], axis=-1, kind="stable")[..., :3]
    np.testing.assert_array_equal(out["index"], top3)
    self.assertEqual(out["dropped"], 0.0)
    # Three distinct experts per token; gates sum to one on real tokens; padding is not kept.
    self.assertTrue(all(len(set(t)) == 3 for t in out["index"].reshape(-1, 3)))
    np.testing.assert_allclose(out["gates"][0].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["kept"][1, 6:], 0.0)
    np.testing.assert_array_equal(out["kept"][0], 1.0)  # capacity 4 * 8 / 4 = S: nothing dropped

  def test_expert_dropout_only_in_training(self):
    def output(rate, mode):
      layer = layers.SparseFFN(num_experts=4, hidden_size=16, group_size=8,
                               expert_dropout_rate=rate, second_policy_train="all",
                               second_policy_eval="all", capacity_factor_eval=1.25)
      graph, mesh, _, y, _ = build(layer, mode=mode)
      return run(graph, mesh, {"y": y})["y"]
    self.assertGreater(np.abs(output(0.5, "train") - output(0.0, "train")).max(), 1e-4)
    np.testing.assert_allclose(output(0.5, "eval"), output(0.0, "eval"), atol=1e-6)

  def test_incremental_decoding_input_without_length(self):
    graph, mesh = layer_harness.new_graph(seed=3)
    batch_dim, length_dim = mtf.Dimension("batch", 4), mtf.Dimension("length", 8)
    model_dim = mtf.Dimension("d_model", D_MODEL)
    variable_dtype = mtf.VariableDType(tf.float32, tf.float32, tf.float32)
    x = mtf.random_normal(mesh, [batch_dim, model_dim])  # one position per sequence
    context = layer_harness.fake_context(mesh, batch_dim, length_dim, model_dim, variable_dtype,
                                         mode="incremental", layout=None, mesh_shape=None,
                                         autoregressive=True, losses=None)
    layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8,
                             second_policy_eval="all")
    with tf.variable_scope("moe"):
      y = layer.call(context, x)
    self.assertEqual(y.shape, x.shape)
    out = run(graph, mesh, {"y": y})
    self.assertTrue(np.all(np.isfinite(out["y"])))
    self.assertGreater(np.abs(out["y"]).max(), 0.0)

  def test_router_summaries_share_one_prefix(self):
    layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8)
    graph, mesh, _, _, _ = build(layer)
    layer_harness.lower(graph, mesh)
    names = sorted(name for name, _ in tf.get_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY))
    self.assertEqual(names, sorted(["moe/router/balance_loss", "moe/router/z_loss",
                                    "moe/router/fraction_dropped", "moe/router/confidence",
                                    "moe/router/entropy", "moe/router/max_logit",
                                    "moe/router/slots_per_token"] +
                                   [f"moe/router/expert_fraction/{e:02d}" for e in range(4)]))

  def test_invalid_settings_name_the_setting(self):
    cases = [
        (dict(num_experts=4, num_selected_experts=5), "num_selected_experts=5"),
        (dict(capacity_factor_train=0.0), "capacity_factor_train=0.0"),
        (dict(capacity_factor_eval=-1.0), "capacity_factor_eval=-1.0"),
        (dict(second_policy_train="sometimes"), "second_policy_train='sometimes'"),
        (dict(second_policy_eval="top"), "second_policy_eval='top'"),
        (dict(group_size=0), "group_size=0"),
        (dict(activation=("gelu", "nope")), "activation 'nope'"),
        (dict(expert_dropout_rate=1.0), "expert_dropout_rate=1.0"),
        (dict(dispatch="scatter"), "dispatch='scatter'"),
    ]
    for kwargs, message in cases:
      with self.assertRaisesRegex(ValueError, message, msg=str(kwargs)):
        layers.SparseFFN(**kwargs)

  def test_batch_prioritized_routing_in_a_decoder_raises(self):
    layer = layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8,
                             batch_prioritized_routing=True)
    with self.assertRaisesRegex(ValueError, "batch_prioritized_routing=True in a decoder"):
      build(layer, autoregressive=True)
    build(layer)  # fine in an encoder


if __name__ == "__main__":
  absltest.main()
