"""st_moe.losses and routing metrics against the paper's formulas written in numpy."""
from absl.testing import absltest
import mesh_tensorflow as mtf
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import losses
from st_moe import routing
import graph_mode
import layer_harness


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

G, S, E = 3, 6, 4


def evaluate(build):
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  tensors = build(mesh)
  lowering = layer_harness.lower(graph, mesh)
  fetches = [lowering.export_to_tf_tensor(t) for t in tensors]
  with tf.Session() as sess:
    return sess.run(fetches)


def np_logsumexp(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def reference_kept(logits, nonpadding, capacity):
  """<bool>[G, S, 2]: MTF's top-2 buffer rule (second policy "all"), written as loops.

  Per group, first choices take their expert's slots in token order; second choices then take what
  is left, in token order; a choice is kept if its slot is below `capacity`. Padding takes none.
  """
  num_groups, group_size, num_experts = logits.shape
  kept = np.zeros((num_groups, group_size, 2), bool)
  for g in range(num_groups):
    used = np.zeros(num_experts, int)
    order = np.argsort(-logits[g], axis=-1, kind="stable")[:, :2]  # softmax keeps the order
    for choice in range(2):
      for s in range(group_size):
        if not nonpadding[g, s]:
          continue
        e = order[s, choice]
        kept[g, s, choice] = used[e] < capacity
        used[e] += 1
  return kept


class LossesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tf.reset_default_graph()
    rng = np.random.RandomState(3)
    self.logits = (rng.randn(G, S, E) * 3.0).astype(np.float32)
    self.nonpadding = (rng.rand(G, S) > 0.3).astype(np.float32)
    self.nonpadding[:, 0] = 1.0
    self.dims = [mtf.Dimension("batch", G), mtf.Dimension("group", S),
                 mtf.Dimension("experts_unsplit", E)]

  def _build(self, mesh, padded):
    logits = mtf.import_tf_tensor(mesh, tf.constant(self.logits), mtf.Shape(self.dims))
    nonpadding = None
    if padded:
      nonpadding = mtf.import_tf_tensor(mesh, tf.constant(self.nonpadding),
                                        mtf.Shape(self.dims[:2]))
    r = routing.route_top_k(logits, self.dims[2], self.dims[1], 2, 2, nonpadding=nonpadding,
                            second_policy="all")
    metrics = routing.routing_metrics(r, self.dims[2], nonpadding)
    return [losses.load_balance_loss(r.router_probs, r.top1_mask, self.dims[2], self.dims[1],
                                     nonpadding),
            losses.router_z_loss(r.router_logits, self.dims[2], nonpadding),
            metrics["fraction_dropped"], metrics["confidence"], metrics["entropy"],
            metrics["expert_fraction/00"], metrics["expert_fraction/03"], r.kept,
            metrics["max_logit"], metrics["slots_per_token"]]

  def _reference(self, padded):
    w = self.nonpadding if padded else np.ones((G, S), np.float32)
    x = self.logits.astype(np.float64)
    p = np.exp(x - np_logsumexp(x)[..., None])
    top1 = np.eye(E)[p.argmax(-1)] * w[..., None]  # [G, S, E]
    f = top1.mean(1)  # fraction of the group's S tokens whose top-1 is e
    big_p = (p * w[..., None]).mean(1)  # mean router probability
    balance = np.mean(E * (f * big_p).sum(-1))
    z = (np_logsumexp(x) ** 2 * w).sum() / w.sum()
    confidence = (p.max(-1) * w).sum() / w.sum()
    entropy = (-(p * np.log(p)).sum(-1) * w).sum() / w.sum()
    fractions = top1.sum((0, 1)) / w.sum()
    return balance, z, confidence, entropy, fractions

  def test_losses_and_metrics_match_formulas(self):
    for padded in (False, True):
      got = evaluate(lambda mesh, p=padded: self._build(mesh, p))
      balance, z, confidence, entropy, fractions = self._reference(padded)
      self.assertAlmostEqual(got[0], balance, places=5, msg=f"balance padded={padded}")
      self.assertAlmostEqual(got[1], z, places=4, msg=f"z-loss padded={padded}")
      self.assertAlmostEqual(got[3], confidence, places=5)
      self.assertAlmostEqual(got[4], entropy, places=5)
      self.assertAlmostEqual(got[5], fractions[0], places=6)
      self.assertAlmostEqual(got[6], fractions[3], places=6)
      # Dropped tokens: real tokens whose choices all lost their slot (capacity 2 per expert).
      w = self.nonpadding if padded else np.ones((G, S))
      kept = reference_kept(self.logits, w, capacity=2)
      np.testing.assert_array_equal(got[7].reshape(kept.shape) > 0.5, kept)
      # The largest logit of a real token (padding excluded).
      self.assertAlmostEqual(got[8], self.logits[w > 0].max(), places=5)
      want_dropped = ((~kept.any(-1)) * w).sum() / w.sum()
      self.assertAlmostEqual(got[2], want_dropped, places=6)
      self.assertGreater(want_dropped, 0.0)
      # E x C / S buffer slots per token: 4 experts x 2 slots for groups of 6 tokens.
      self.assertAlmostEqual(got[9], 4 * 2 / 6, places=6)

  def test_balance_loss_by_hand_and_collapsed(self):
    # One group of 10 tokens over 2 experts: nine at probabilities (0.51, 0.49), top-1 expert 0,
    # and one at (0, 1), top-1 expert 1. f = (0.9, 0.1), P = (0.459, 0.541):
    # 2 x (0.9 x 0.459 + 0.1 x 0.541) = 0.9344 (below 1: the loss has no lower bound of 1).
    # Collapsed: every token on expert 0 with probability ~1 gives E.
    pair = [mtf.Dimension("batch", 1), mtf.Dimension("group", 10),
            mtf.Dimension("experts_unsplit", 2)]
    dims = self.dims

    def build(mesh):
      probs = np.array([[0.51, 0.49]] * 9 + [[0.0, 1.0]], np.float32)[None]
      top1 = np.eye(2, dtype=np.float32)[probs.argmax(-1)]
      collapsed = mtf.import_tf_tensor(
          mesh, tf.constant(np.tile([50.0, 0, 0, 0], (G, S, 1)).astype(np.float32)),
          mtf.Shape(dims))
      first = mtf.import_tf_tensor(
          mesh, tf.constant(np.tile(np.eye(E)[0], (G, S, 1)).astype(np.float32)),
          mtf.Shape(dims))
      return [losses.load_balance_loss(
                  mtf.import_tf_tensor(mesh, tf.constant(probs), mtf.Shape(pair)),
                  mtf.import_tf_tensor(mesh, tf.constant(top1), mtf.Shape(pair)),
                  pair[2], pair[1]),
              losses.load_balance_loss(mtf.softmax(collapsed, dims[2]), first, dims[2],
                                       dims[1])]

    by_hand, collapsed = evaluate(build)
    self.assertAlmostEqual(by_hand, 0.9344, places=5)
    self.assertAlmostEqual(collapsed, float(E), places=4)

  def test_scale_divides_by_microbatches(self):
    def build(mesh):
      one = mtf.ones(mesh, mtf.Shape([]))
      return [losses.scale(one, 1e-3), losses.scale(one, 1e-2, num_microbatches=4)]
    a, b = evaluate(build)
    self.assertAlmostEqual(a, 1e-3, places=9)
    self.assertAlmostEqual(b, 2.5e-3, places=9)


if __name__ == "__main__":
  absltest.main()
