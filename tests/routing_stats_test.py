"""Tests of st_moe.analysis.routing_stats on hand-made routing decisions."""
import math

from absl.testing import absltest
import numpy as np

from st_moe.analysis import routing_stats as rs


class TokenClassTest(absltest.TestCase):
  """The paper's Table 13 categories, on pieces and texts whose classes are known by hand."""

  def test_classes_of_single_word_pieces(self):
    cases = {
        "<extra_id_3>": rs.SENTINEL,
        ",": rs.PUNCTUATION,
        "\u2581(": rs.PUNCTUATION,
        "\u25811999": rs.NUMBER,
        "3.14": rs.NUMBER,
        "\u2581seven": rs.NUMBER,
        "\u2581Seven": rs.NUMBER,
        "\u2581the": rs.CONJ_ARTICLE,
        "\u2581and": rs.CONJ_ARTICLE,
        "\u2581The": rs.CONJ_ARTICLE,
        "\u2581blue": rs.VISUAL,
        "\u2581upper": rs.VISUAL,
        "\u2581returns": rs.VERB,
        "\u2581identified": rs.VERB,
        "\u2581falling": rs.VERB,
        "\u2581module": rs.OTHER,
        "\u2581red_ing": rs.OTHER,  # not alphabetic: no suffix rule
        "\u2581": rs.OTHER,
        "a2b": rs.OTHER,
        "</s>": rs.OTHER,
    }
    for piece, expected in cases.items():
      self.assertEqual(rs.token_class(piece), expected, piece)

  def test_sentinel_flag_wins(self):
    self.assertEqual(rs.token_class("\u2581the", is_sentinel=True), rs.SENTINEL)

  def test_capitalised_word_is_a_name_only_inside_a_sentence(self):
    self.assertEqual(rs.token_class("\u2581Python", sentence_start=True), rs.OTHER)
    self.assertEqual(rs.token_class("\u2581Python", sentence_start=False), rs.PROPER_NAME)
    # A list word keeps its class wherever it stands, capitalised or not.
    self.assertEqual(rs.token_class("\u2581And", sentence_start=False), rs.CONJ_ARTICLE)

  def test_running_text(self):
    # "Returns the theory of Mikhail in 37 <extra_id_0>. Seven blue" as SentencePiece might split it.
    pieces = ["\u2581Returns", "\u2581the", "\u2581the", "ory", "\u2581of", "\u2581Mi", "khail",
              "\u2581in", "\u258137", "<extra_id_0>", ".", "\u2581Seven", "\u2581blue"]
    expected = [
        rs.VERB,  # a list verb, even at the sentence start
        rs.CONJ_ARTICLE,
        rs.OTHER, rs.OTHER,  # "theory": the word is classified, not its first piece
        rs.OTHER,  # "of": a preposition, not a conjunction
        rs.PROPER_NAME, rs.PROPER_NAME,  # both pieces of a capitalised word inside a sentence
        rs.OTHER, rs.NUMBER, rs.SENTINEL, rs.PUNCTUATION, rs.NUMBER, rs.VISUAL,
    ]
    got = [rs.TOKEN_CLASSES[c] for c in rs.classify_tokens(pieces)]
    self.assertEqual(got, expected)

  def test_sentence_start_after_full_stop_not_after_comma(self):
    pieces = ["\u2581x", ".", "\u2581Then", "\u2581y", ",", "\u2581Then"]
    got = [rs.TOKEN_CLASSES[c] for c in rs.classify_tokens(pieces)]
    self.assertEqual(got[2], rs.OTHER)  # starts a sentence
    self.assertEqual(got[5], rs.PROPER_NAME)  # inside one

  def test_sentinel_mask_marks_sentinels(self):
    got = rs.classify_tokens(["\u2581the", "\u2581the"], sentinel_mask=[False, True])
    self.assertEqual([rs.TOKEN_CLASSES[c] for c in got], [rs.CONJ_ARTICLE, rs.SENTINEL])

  def test_mean_entropy_where(self):
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    self.assertAlmostEqual(rs.mean_entropy_where(probs, [True, False, True]), math.log(2),
                           places=12)
    self.assertAlmostEqual(rs.mean_entropy_where(probs, [False, True, False]), 0.0, places=12)
    self.assertIsNone(rs.mean_entropy_where(probs, [False, False, False]))


class StatsTest(absltest.TestCase):

  def test_entropy_bounds(self):
    e = 4
    uniform = np.full((3, e), 1.0 / e)
    certain = np.eye(e)[:3]
    self.assertAlmostEqual(rs.mean_router_entropy(uniform), math.log(e), places=12)
    self.assertAlmostEqual(rs.mean_router_entropy(certain), 0.0, places=12)
    mixed = np.array([[0.5, 0.5, 0.0, 0.0]])
    self.assertAlmostEqual(rs.mean_router_entropy(mixed), math.log(2), places=12)
    self.assertAlmostEqual(rs.uniform_entropy(32), 3.4657, places=4)
    # All tokens on one expert: 0.0, printed "0" (not "-0") in the tracer's tables.
    self.assertEqual(str(rs.load_entropy(np.array([2, 2, 2]), 4)), "0.0")

  def test_entropy_rejects_empty(self):
    with self.assertRaisesRegex(ValueError, "router_probs"):
      rs.mean_router_entropy(np.zeros((0, 4)))

  def test_load_and_load_entropy(self):
    top1 = np.array([0, 0, 1, 3])
    np.testing.assert_allclose(rs.expert_load(top1, 4), [0.5, 0.25, 0.0, 0.25])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    self.assertAlmostEqual(rs.load_entropy(top1, 4), expected, places=12)

  def test_top2_log_margin_is_the_gap_between_the_two_largest_logits(self):
    # Logits (2, 1, 0) -> margin 1; a tie -> 0; a one-hot-like (ln 0.97 - ln 0.01) by hand.
    logits = np.array([[2.0, 1.0, 0.0], [0.5, 3.0, 3.0]])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs = np.concatenate([probs, [[0.97, 0.01, 0.02]]])
    np.testing.assert_allclose(rs.top2_log_margin(probs),
                               [1.0, 0.0, math.log(0.97) - math.log(0.02)], atol=1e-12)
    with self.assertRaisesRegex(ValueError, "E >= 2"):
      rs.top2_log_margin(np.ones((3, 1)))

  def test_first_expert_agreement(self):
    self.assertAlmostEqual(rs.first_expert_agreement([0, 1, 2, 3], [0, 1, 3, 2]), 0.5)
    self.assertAlmostEqual(rs.first_expert_agreement(np.array([[1], [1], [0]]), [1, 0, 0]),
                           2 / 3)
    with self.assertRaisesRegex(ValueError, "same tokens: 3 and 2"):
      rs.first_expert_agreement([0, 1, 2], [0, 1])

  def test_dropped_fraction_counts_tokens_with_no_kept_choice(self):
    kept = np.array([[True, False], [False, False], [False, True], [True, True]])
    self.assertAlmostEqual(rs.dropped_fraction(kept), 0.25)
    self.assertAlmostEqual(rs.dropped_fraction(np.array([True, False])), 0.5)

  def test_class_counts_shares_and_base_rates(self):
    top1 = np.array([0, 0, 1, 1, 1, 2])
    classes = np.array([0, 1, 1, 1, 5, 5])
    counts = rs.class_counts(top1, classes, num_experts=4)
    self.assertEqual(counts.shape, (4, len(rs.TOKEN_CLASSES)))
    self.assertEqual(counts.sum(), 6)
    shares = rs.class_shares(counts)
    np.testing.assert_allclose(shares[:3].sum(axis=1), 1.0)
    np.testing.assert_allclose(shares[3], 0.0)  # idle expert
    np.testing.assert_allclose(shares[1], [0, 2 / 3, 0, 0, 0, 1 / 3, 0, 0])
    np.testing.assert_allclose(rs.base_rates(classes), [1 / 6, 1 / 2, 0, 0, 0, 1 / 3, 0, 0])

  def test_specialized_experts(self):
    # 100 tokens: 10% sentinels overall; expert 0 takes 9 sentinels of its 10 tokens.
    top1 = np.array([0] * 10 + [1] * 90)
    classes = np.array([0] * 9 + [5] + [0] * 1 + [5] * 89)
    found = rs.specialized_experts(rs.class_counts(top1, classes, 2))
    self.assertEqual([(e, name) for e, name, _, _ in found], [(0, rs.SENTINEL)])
    self.assertAlmostEqual(found[0][2], 0.9)
    self.assertAlmostEqual(found[0][3], 0.1)

  def test_top_tokens(self):
    top1 = np.array([0, 0, 0, 1])
    pieces = ["a", "b", "a", "c"]
    self.assertEqual(rs.top_tokens(top1, pieces, 3, n=2), [[("a", 2), ("b", 1)], [("c", 1)], []])


if __name__ == "__main__":
  absltest.main()
