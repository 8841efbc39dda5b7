"""Statistics of recorded routing decisions, for the routing tracer and the paper's tables.

Pure numpy over arrays the tracer exports from a model; no TensorFlow here. Dimensions:
  N  tokens (non-padding tokens of the traced batch, flattened)
  E  experts of one sparse layer
  K  experts chosen per token (top-k)
  T  token classes (TOKEN_CLASSES)

The paper's qualitative routing analysis (ST-MoE, arXiv 2202.08906, Sec. 7 and its routing-entropy
table) reports, per sparse layer, the entropy of the router's distribution over experts (averaged
over tokens; the uniform bound is ln E) and which kinds of tokens each encoder expert takes.
"""
import math
import re
import unicodedata

import numpy as np

SENTINEL = "sentinel"
PUNCTUATION = "punctuation"
NUMBER = "number"
CAPITALIZED = "capitalized word"
FUNCTION_WORD = "function word"
OTHER = "other word piece"
TOKEN_CLASSES = (SENTINEL, PUNCTUATION, NUMBER, CAPITALIZED, FUNCTION_WORD, OTHER)

# Articles, conjunctions, prepositions, pronouns, auxiliaries and other closed-class English words.
FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet for if then than that though although because while whereas
unless until since as of in on at by to from with without within into onto upon over under
about above below between among through during before after against along across around
beyond near off out up down via per is are was were be been being am do does did done have
has had having will would shall should can could may might must not no it its it's this these
those there here which who whom whose what where when why how i me my we us our you your he
him his she her they them their all any each every some such other another both either neither
one also only just very too more most much many few own same
""".split())

_SENTINEL_RE = re.compile(r"^<extra_id_\d+>$")
_WORD_START = "\u2581"  # SentencePiece's word-boundary marker.


def token_class(piece, is_sentinel=False):
  """Class of one vocabulary piece.

  Args:
    piece: the token's text as the vocabulary spells it (SentencePiece pieces may start with "▁").
    is_sentinel: whether the id is one of the span-corruption sentinels (extra ids).

  Returns:
    one of TOKEN_CLASSES.
  """
  if is_sentinel or _SENTINEL_RE.match(piece):
    return SENTINEL
  text = piece.replace(_WORD_START, "").strip()
  if not text:
    return OTHER
  if all(unicodedata.category(c).startswith(("P", "S")) for c in text):
    return PUNCTUATION
  if any(c.isdigit() for c in text) and all(c.isdigit() or c in ".,:/-" for c in text):
    return NUMBER
  if text.lower() in FUNCTION_WORDS and (piece.startswith(_WORD_START) or text.islower()):
    return FUNCTION_WORD
  if text[0].isupper():
    return CAPITALIZED
  return OTHER


def classify_tokens(pieces, sentinel_mask=None):
  """<int32>[N] class index into TOKEN_CLASSES for each piece."""
  if sentinel_mask is None:
    sentinel_mask = [False] * len(pieces)
  return np.array([TOKEN_CLASSES.index(token_class(p, s))
                   for p, s in zip(pieces, sentinel_mask)], dtype=np.int32)


def entropy(p, axis=-1):
  """Entropy in nats of distributions along `axis` (0 log 0 = 0)."""
  p = np.asarray(p, dtype=np.float64)
  logp = np.log(np.where(p > 0, p, 1.0))
  return 0.0 - np.sum(p * logp, axis=axis)  # 0.0 - x: a certain distribution gives 0.0, not -0.0


def mean_router_entropy(router_probs):
  """Mean over tokens of the entropy of each token's router distribution.

  Args:
    router_probs: <float>[N, E] softmax of the router logits of non-padding tokens.

  Returns:
    nats, in [0, ln E]: ln E when every token's router is uniform, 0 when it is certain.
  """
  router_probs = np.asarray(router_probs)
  if router_probs.ndim != 2 or router_probs.shape[0] == 0:
    raise ValueError(f"router_probs must be [N, E] with N > 0, got shape {router_probs.shape}")
  return float(np.mean(entropy(router_probs)))


def expert_load(top1_expert, num_experts):
  """<float64>[E] fraction of tokens whose first choice is each expert."""
  counts = np.bincount(np.asarray(top1_expert).reshape(-1), minlength=num_experts)
  total = counts.sum()
  return counts / total if total else counts.astype(np.float64)


def load_entropy(top1_expert, num_experts):
  """Entropy (nats) of how tokens spread over experts by first choice; ln E when balanced."""
  return float(entropy(expert_load(top1_expert, num_experts)))


def dropped_fraction(kept):
  """Fraction of tokens that no expert processed (all K choices over capacity).

  Args:
    kept: <bool>[N, K] whether each of a token's choices got a buffer position. A choice that the
      second-expert policy declined counts as not kept.
  """
  kept = np.asarray(kept, dtype=bool)
  if kept.ndim == 1:
    kept = kept[:, None]
  return float(np.mean(~kept.any(axis=-1))) if kept.size else 0.0


def class_counts(top1_expert, classes, num_experts):
  """<int64>[E, T] how many tokens of each class each expert takes as first choice."""
  counts = np.zeros((num_experts, len(TOKEN_CLASSES)), dtype=np.int64)
  np.add.at(counts, (np.asarray(top1_expert), np.asarray(classes)), 1)
  return counts


def class_shares(counts):
  """<float64>[E, T]: each expert's tokens split by class (rows sum to 1; an idle expert's row is 0)."""
  counts = np.asarray(counts, dtype=np.float64)
  totals = counts.sum(axis=1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def base_rates(classes):
  """<float64>[T] fraction of all tokens in each class."""
  counts = np.bincount(np.asarray(classes), minlength=len(TOKEN_CLASSES)).astype(np.float64)
  return counts / max(counts.sum(), 1.0)


def specialized_experts(counts, ratio=2.0, min_tokens=8, min_share=0.2):
  """Experts whose share of a class is well above that class's base rate.

  An expert specialises in class t when it took at least `min_tokens` tokens, at least `min_share`
  of them are of class t, and that share is at least `ratio` times the class's share of all tokens.

  Returns:
    list of (expert, class name, share, base rate), strongest first.
  """
  counts = np.asarray(counts)
  shares = class_shares(counts)
  rates = counts.sum(axis=0) / max(counts.sum(), 1)
  found = []
  for e in range(counts.shape[0]):
    if counts[e].sum() < min_tokens:
      continue
    for t, name in enumerate(TOKEN_CLASSES):
      if rates[t] > 0 and shares[e, t] >= min_share and shares[e, t] >= ratio * rates[t]:
        found.append((e, name, float(shares[e, t]), float(rates[t])))
  return sorted(found, key=lambda f: -f[2] / f[3])


def top_tokens(top1_expert, pieces, num_experts, n=8):
  """Per expert, its `n` most frequent pieces as (piece, count), most frequent first."""
  result = []
  top1_expert = np.asarray(top1_expert)
  pieces = np.asarray(pieces, dtype=object)
  for e in range(num_experts):
    mine = pieces[top1_expert == e]
    if mine.size == 0:
      result.append([])
      continue
    values, counts = np.unique(mine.astype(str), return_counts=True)
    order = np.lexsort((values, -counts))[:n]
    result.append([(str(values[i]), int(counts[i])) for i in order])
  return result


def uniform_entropy(num_experts):
  """ln E: the largest possible routing entropy over E experts."""
  return math.log(num_experts)
