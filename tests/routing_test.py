"""st_moe.routing against a small numpy reference of top-k routing with capacity.

The reference below is written independently of the mtf code: a greedy loop that hands out
buffer slots one choice round at a time (all first choices, then all second choices, ...), token
by token in group order (or by decreasing top-1 probability with batch-prioritized routing).
"""
import itertools

from absl.testing import absltest
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import moe as upstream_moe
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import routing
import graph_mode


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

G, S, E = 2, 8, 4


def softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def reference_route(logits, k, capacity, nonpadding=None, policy="all", threshold=0.2,
                    renormalize=True, prioritized=False):
  """numpy: dispatch, combine [G, S, E, C], index, gates, kept [G, S, K]."""
  groups, size, experts = logits.shape
  probs = softmax(logits.astype(np.float64))
  if nonpadding is None:
    nonpadding = np.ones((groups, size))
  dispatch = np.zeros((groups, size, experts, capacity))
  combine = np.zeros_like(dispatch)
  index = np.zeros((groups, size, k), np.int64)
  gates = np.zeros((groups, size, k))
  kept = np.zeros((groups, size, k))
  for g in range(groups):
    for s in range(size):
      ranked = sorted(range(experts), key=lambda e, p=probs[g, s]: (-p[e], e))[:k]
      index[g, s] = ranked
      raw = probs[g, s, ranked] * nonpadding[g, s]
      # MTF renormalises only k > 1 gates (_top_n_gating: `if len(gates) > 1`; _switch_gating).
      gates[g, s] = raw / (raw.sum() + 1e-9) if renormalize and k > 1 else raw
    if prioritized:
      order = sorted(range(size), key=lambda s, g=g: (-probs[g, s].max(), s))
    else:
      order = list(range(size))
    taken = np.zeros(experts, np.int64)
    for i in range(k):
      for s in order:
        if not nonpadding[g, s]:
          continue
        if i > 0 and (policy == "none" or (policy == "threshold" and gates[g, s, i] <= threshold)):
          continue
        e = index[g, s, i]
        if taken[e] < capacity:
          dispatch[g, s, e, taken[e]] = 1.0
          combine[g, s, e, taken[e]] = gates[g, s, i]
          kept[g, s, i] = 1.0
          taken[e] += 1
  return dispatch, combine, index, gates, kept


def to_bfloat16(x):
  """numpy: float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
  bits = np.asarray(x, np.float32).view(np.uint32)
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
  return rounded.astype(np.uint32).view(np.float32)


def evaluate(build):
  """Builds mtf tensors with build(mesh) -> list, lowers on one CPU slice, returns numpy values."""
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  tensors = build(mesh)
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
  lowering = mtf.Lowering(graph, {mesh: mesh_impl})
  fetches = [lowering.export_to_tf_tensor(t) for t in tensors]
  with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    return sess.run(fetches)


def import_tensor(mesh, value, dims):
  return mtf.import_tf_tensor(mesh, tf.constant(value), mtf.Shape(dims))


class RoutingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tf.reset_default_graph()
    rng = np.random.RandomState(0)
    self.logits = (rng.randn(G, S, E) * 2.0).astype(np.float32)
    # Padding: last two tokens of group 0, the first token of group 1.
    self.nonpadding = np.ones((G, S), np.float32)
    self.nonpadding[0, -2:] = 0.0
    self.nonpadding[1, 0] = 0.0

  def test_matches_numpy_reference(self):
    cases = list(itertools.product(
        (1, 2, 3),                # k
        (0.5, 1.0, 2.0),          # capacity factor
        ("all", "none", "threshold"),
        (False, True),            # padding
        (False, True),            # batch-prioritized
        ))
    groups_dim, group_dim = mtf.Dimension("batch", G), mtf.Dimension("group", S)
    experts_dim = mtf.Dimension("experts_unsplit", E)

    def build(mesh):
      logits = import_tensor(mesh, self.logits, [groups_dim, group_dim, experts_dim])
      nonpadding = import_tensor(mesh, self.nonpadding, [groups_dim, group_dim])
      out = []
      for k, cf, policy, padded, prioritized in cases:
        capacity = routing.expert_capacity(S, cf, E, min_expert_capacity=1)
        r = routing.route_top_k(
            logits, experts_dim, group_dim, capacity, k,
            nonpadding=nonpadding if padded else None, second_policy=policy,
            second_threshold=0.3, batch_prioritized=prioritized)
        out += [r.dispatch, r.combine, r.expert_index, r.gates, r.kept]
      return out

    values = evaluate(build)
    dropped_somewhere = 0
    for n, (k, cf, policy, padded, prioritized) in enumerate(cases):
      capacity = max(min(S, int(S * cf / E)), 1)
      want = reference_route(self.logits, k, capacity, self.nonpadding if padded else None,
                             policy, 0.3, prioritized=prioritized)
      got = values[5 * n:5 * n + 5]
      for name, w, g in zip(("dispatch", "combine", "index", "gates", "kept"), want, got):
        np.testing.assert_allclose(
            g, w, atol=1e-6, err_msg=f"{name} k={k} cf={cf} {policy} pad={padded} "
            f"bpr={prioritized}")
      tokens = self.nonpadding.sum() if padded else G * S
      dropped_somewhere += int(want[4][..., 0].sum() < tokens)
    # The cases must exercise overflow, not only the easy path.
    self.assertGreater(dropped_somewhere, 10)

  def test_raw_probability_gates(self):
    groups_dim, group_dim = mtf.Dimension("batch", G), mtf.Dimension("group", S)
    experts_dim = mtf.Dimension("experts_unsplit", E)

    def build(mesh):
      logits = import_tensor(mesh, self.logits, [groups_dim, group_dim, experts_dim])
      r = routing.route_top_k(logits, experts_dim, group_dim, 4, 2, second_policy="all",
                              renormalize_gates=False)
      return [r.combine, r.gates]

    combine, gates = evaluate(build)
    _, want_combine, _, want_gates, _ = reference_route(self.logits, 2, 4, renormalize=False)
    np.testing.assert_allclose(gates, want_gates, atol=1e-6)
    np.testing.assert_allclose(combine, want_combine, atol=1e-6)
    self.assertLess(gates.sum(-1).max(), 1.0)

  def test_top1_gate_is_the_raw_probability_and_the_router_learns_from_it(self):
    # At k = 1 a renormalised gate would be p / p = 1 for every token: the combine weights would
    # not depend on the logits, and the task loss would send the router no gradient.
    groups_dim, group_dim = mtf.Dimension("batch", G), mtf.Dimension("group", S)
    experts_dim = mtf.Dimension("experts_unsplit", E)

    def build(mesh):
      logits = import_tensor(mesh, self.logits, [groups_dim, group_dim, experts_dim])
      r = routing.route_top_k(logits, experts_dim, group_dim, S, 1, renormalize_gates=True)
      (grad,) = mtf.gradients([mtf.reduce_sum(r.combine)], [logits])
      return [r.gates, grad]

    gates, grad = evaluate(build)
    probs = softmax(self.logits.astype(np.float64))
    np.testing.assert_allclose(gates[..., 0], probs.max(-1), atol=1e-6)
    # By hand: d p_top / d logit_j = p_top * ([j = top] - p_j), every token kept (capacity S).
    top = np.eye(E)[probs.argmax(-1)]
    want = probs.max(-1, keepdims=True) * (top - probs)
    np.testing.assert_allclose(grad, want, atol=1e-6)
    self.assertGreater(np.abs(want).min(), 1e-4)

  def test_random_policy_keeps_second_choice_with_probability_gate_over_threshold(self):
    size, experts, threshold = 4096, 4, 0.3
    logits = np.random.RandomState(1).randn(1, size, experts).astype(np.float32)
    groups_dim, group_dim = mtf.Dimension("batch", 1), mtf.Dimension("group", size)
    experts_dim = mtf.Dimension("experts_unsplit", experts)

    def build(mesh):
      x = import_tensor(mesh, logits, [groups_dim, group_dim, experts_dim])
      r = routing.route_top_k(x, experts_dim, group_dim, size, 2, second_policy="random",
                              second_threshold=threshold)
      return [r.kept, r.gates]

    kept, gates = evaluate(build)
    np.testing.assert_array_equal(kept[..., 0], 1.0)
    expected = np.minimum(1.0, gates[..., 1] / threshold).mean()
    self.assertAlmostEqual(kept[..., 1].mean(), expected, delta=0.03)
    self.assertLess(kept[..., 1].mean(), 0.99)

  def test_expert_capacity_formula(self):
    self.assertEqual(routing.expert_capacity(1024, 1.25, 32), 40)
    self.assertEqual(routing.expert_capacity(1024, 2.0, 32), 64)
    self.assertEqual(routing.expert_capacity(64, 1.25, 32), 4)  # min_expert_capacity
    self.assertEqual(routing.expert_capacity(8, 8.0, 2), 8)  # at most S
    self.assertEqual(routing.expert_capacity(1024, 1.25, 32, 4, 2, multiply_by_k=True), 80)

  def test_group_tokens_matches_upstream_split_into_groups(self):
    # Upstream's function itself is the reference (it rounds the number of groups down).
    compared = 0
    for num_tokens in (1, 2, 8, 60, 64, 96, 384, 1000, 1500, 2048, 4096, 6000):
      for group_size in (1, 3, 8, 64, 1000, 1024, 4096):
        for mesh in (1, 2, 4, 8):
          if num_tokens % mesh:
            continue
          want = upstream_moe._split_into_groups(num_tokens, group_size, mesh)
          if want[1] == 1 and group_size > 1 and num_tokens > mesh:
            continue  # upstream's silent fallback: ours raises (next test)
          self.assertEqual(routing.group_tokens(num_tokens, group_size, mesh), want,
                           (num_tokens, group_size, mesh))
          compared += 1
    self.assertGreater(compared, 200)
    # By hand: 1,500 tokens at 1,024 make one group (not 2 x 750); 60 tokens at 8 over 2
    # replicas: 60 // 8 = 7 groups, the first even divisor of 60 from there is 10.
    self.assertEqual(routing.group_tokens(1500, 1024), (1, 1500))
    self.assertEqual(routing.group_tokens(4096, 1024), (4, 1024))
    self.assertEqual(routing.group_tokens(64, 1024, 8), (8, 8))
    self.assertEqual(routing.group_tokens(60, 8, 2), (10, 6))
    self.assertEqual(routing.group_tokens(1, 1024), (1, 1))  # decoding one sequence
    with self.assertRaisesRegex(ValueError, "not a multiple of 3"):
      routing.group_tokens(64, 8, 3)

  def test_group_tokens_raises_instead_of_one_token_groups(self):
    # 2 x 1031 tokens (1031 is prime) over 2 replicas at group size 8: upstream's only split is
    # 2062 groups of one token; the largest working alternative is 2 groups of 1031, which
    # needs 2062 // group_size <= 2, i.e. group_size >= 688.
    self.assertEqual(upstream_moe._split_into_groups(2062, 8, 2), (2062, 1))
    with self.assertRaisesRegex(
        ValueError, r"2062 tokens .* group_size=8 over a mesh dimension of size 2 .*"
        r"group_size >= 688 \(2 groups of 1031 tokens\)"):
      routing.group_tokens(2062, 8, 2)
    self.assertEqual(routing.group_tokens(2062, 688, 2), (2, 1031))
    self.assertEqual(upstream_moe._split_into_groups(2062, 687, 2), (2062, 1))
    # A prime number of tokens on one replica: 1031 at group size 8 (1031 // 516 = 1).
    with self.assertRaisesRegex(ValueError, r"group_size >= 516 \(1 groups of 1031"):
      routing.group_tokens(1031, 8)
    # Groups of one token asked for, or forced by the mesh, are not an error.
    self.assertEqual(routing.group_tokens(1031, 1), (1031, 1))
    self.assertEqual(routing.group_tokens(4, 1024, 4), (4, 1))

  def test_router_logits_are_float32_under_bfloat16(self):
    groups_dim, group_dim = mtf.Dimension("batch", G), mtf.Dimension("group", S)
    model_dim, experts_dim = mtf.Dimension("d_model", 6), mtf.Dimension("experts_unsplit", E)
    mesh = mtf.Mesh(mtf.Graph(), "mesh")
    x = mtf.cast(mtf.ones(mesh, [groups_dim, group_dim, model_dim]), tf.bfloat16)
    logits = routing.router_logits(x, experts_dim, train=True, jitter_eps=0.01)
    self.assertEqual(logits.dtype, tf.float32)
    self.assertEqual(logits.shape.dims, [groups_dim, group_dim, experts_dim])
    kernel, = [v for v in mesh.graph.trainable_variables if v.name.endswith("router/kernel")]
    self.assertEqual(kernel.activation_dtype, tf.float32)

  def test_bfloat16_rounding_reference_by_hand(self):
    # 1 + 2^-8 is halfway between bfloat16 neighbours 1 and 1 + 2^-7: ties go to even (1.0);
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to even (1 + 2^-6).
    np.testing.assert_array_equal(
        to_bfloat16([1 + 2 ** -8, 1 + 3 * 2 ** -8, 100.3, -0.1]),
        np.array([1.0, 1 + 2 ** -6, 100.5, -0.10009765625], np.float32))

  def test_bfloat16_router_precision_rounds_inputs_logits_and_softmax(self):
    groups_dim, group_dim = mtf.Dimension("batch", G), mtf.Dimension("group", S)
    model_dim, experts_dim = mtf.Dimension("d_model", 6), mtf.Dimension("experts_unsplit", E)
    # Large inputs give large logits, where bfloat16's 8 significant bits cost most.
    x_value = (np.random.RandomState(3).randn(G, S, 6) * 300).astype(np.float32)

    def build(mesh):
      x = import_tensor(mesh, x_value, [groups_dim, group_dim, model_dim])
      out = []
      for precision in ("float32", "bfloat16"):
        logits = routing.router_logits(x, experts_dim, name=f"router_{precision}",
                                       precision=precision)
        kernel, = [v for v in mesh.graph.trainable_variables
                   if v.name == f"router_{precision}/kernel"]
        result = routing.route_top_k(logits, experts_dim, group_dim, capacity=S,
                                     precision=precision)
        out += [logits, kernel.outputs[0], result.router_probs]
      return out

    f32_logits, f32_kernel, f32_probs, bf_logits, bf_kernel, bf_probs = evaluate(build)
    want_logits = to_bfloat16(np.einsum("gsm,me->gse", to_bfloat16(x_value), bf_kernel))
    # Equal to the last bfloat16 step (a float32 sum next to a rounding boundary may round the
    # other way).
    np.testing.assert_allclose(bf_logits, want_logits, rtol=2 ** -7)
    np.testing.assert_array_equal(to_bfloat16(bf_logits), bf_logits)  # on the bfloat16 grid
    np.testing.assert_allclose(f32_logits, np.einsum("gsm,me->gse", x_value, f32_kernel),
                               rtol=1e-5, atol=1e-4)
    self.assertGreater(np.abs(f32_logits).max(), 16.0)
    exps = to_bfloat16(np.exp(bf_logits - bf_logits.max(-1, keepdims=True)))
    want_probs = to_bfloat16(exps / exps.sum(-1, keepdims=True))
    np.testing.assert_allclose(bf_probs, want_probs, rtol=2 ** -7, atol=1e-7)
    np.testing.assert_array_equal(to_bfloat16(bf_probs), bf_probs)
    np.testing.assert_allclose(f32_probs, softmax(f32_logits), rtol=1e-5, atol=1e-6)
    self.assertFalse(np.array_equal(to_bfloat16(f32_probs), f32_probs))  # float32 is not rounded

  def test_router_jitter_in_training_only(self):
    groups_dim, group_dim = mtf.Dimension("batch", G), mtf.Dimension("group", S)
    model_dim, experts_dim = mtf.Dimension("d_model", 6), mtf.Dimension("experts_unsplit", E)
    x_value = np.random.RandomState(2).randn(G, S, 6).astype(np.float32)

    def build(mesh):
      x = import_tensor(mesh, x_value, [groups_dim, group_dim, model_dim])
      out = []
      for n, train in enumerate((True, False)):
        logits = routing.router_logits(x, experts_dim, jitter_eps=0.5, train=train,
                                       name=f"router_{n}")
        kernel, = [v for v in mesh.graph.trainable_variables if v.name == f"router_{n}/kernel"]
        plain = mtf.einsum([x, kernel.outputs[0]], logits.shape)
        out += [logits, plain]
      return out

    train_jittered, train_plain, eval_logits, eval_plain = evaluate(build)
    self.assertGreater(np.abs(train_jittered - train_plain).max(), 1e-3)
    np.testing.assert_allclose(eval_logits, eval_plain, atol=1e-6)

if __name__ == "__main__":
  absltest.main()
