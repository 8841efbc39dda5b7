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

# The paper's Table 13 categories (encoder expert specialisation), then everything else. Without a
# part-of-speech tagger, verbs, proper names and visual descriptions are told by word lists and
# spelling (see word_class): a heuristic, stated as such wherever the categories are reported.
SENTINEL = "sentinel"
PUNCTUATION = "punctuation"
CONJ_ARTICLE = "conjunction or article"
VERB = "verb"
VISUAL = "visual description"
PROPER_NAME = "proper name"
NUMBER = "number"
OTHER = "other"
TOKEN_CLASSES = (SENTINEL, PUNCTUATION, CONJ_ARTICLE, VERB, VISUAL, PROPER_NAME, NUMBER, OTHER)

# Articles and conjunctions (coordinating and the common subordinating ones): Table 13's
# "the / a / and / or".
CONJ_ARTICLE_WORDS = frozenset("""
a an the and or but nor yet so either neither both whether if because although though while
whereas unless until since
""".split())
# Written numbers (Table 13's "Seven, two" beside "37, 19.").
NUMBER_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred
thousand million billion first second third fourth fifth once twice half
""".split())
# Colour and spatial position (Table 13's "dark, upper, blue, inner, yellow, bright").
VISUAL_WORDS = frozenset("""
red green blue yellow orange purple violet pink brown black white grey gray dark bright light
colour color upper lower inner outer top bottom left right middle center centre front back
above below beside vertical horizontal diagonal
""".split())
# Common verbs that neither suffix rule finds (auxiliaries, irregular pasts, docstring verbs).
VERB_WORDS = frozenset("""
is are was were be been am do does did done have has had can could may might must shall should
will would get gets got make makes made take takes took give gives gave go goes went see sees saw
use uses return returns raise raises call calls set sets find finds found run runs ran
""".split())
_VERB_SUFFIXES = ("ed", "ing")
_SENTENCE_END = (".", "!", "?", ":")
_CONTROL = frozenset(["</s>", "<s>", "<unk>", "<pad>"])

_SENTINEL_RE = re.compile(r"^<extra_id_\d+>$")
_WORD_START = "\u2581"  # SentencePiece's word-boundary marker.


def _is_punctuation(text):
  return all(unicodedata.category(c).startswith(("P", "S")) for c in text)


def _is_numeral(text):
  return any(c.isdigit() for c in text) and all(c.isdigit() or c in ".,:/-" for c in text)


def word_class(word, sentence_start=True):
  """Class of one whole word (pieces joined, no word-start mark), given whether a sentence starts
  with it.

  conjunction or article, number (digits or written), visual description and verb by word lists;
  a verb also by its suffix (a lower-case word of 5 or more letters ending in -ed or -ing); a proper
  name is a capitalised word that does not start a sentence ("Python" in "written in Python", not
  "Returns" at the start of a docstring). Everything else is OTHER.
  """
  if not word:
    return OTHER
  if _is_punctuation(word):
    return PUNCTUATION
  if _is_numeral(word):
    return NUMBER
  lower = word.lower()
  if word.islower() or word == word.capitalize() or word.isupper():
    for words, name in ((CONJ_ARTICLE_WORDS, CONJ_ARTICLE), (NUMBER_WORDS, NUMBER),
                        (VISUAL_WORDS, VISUAL), (VERB_WORDS, VERB)):
      if lower in words:
        return name
  if word.isalpha() and word.islower() and len(word) >= 5 and word.endswith(_VERB_SUFFIXES):
    return VERB
  if word[0].isupper() and word.isalpha() and not sentence_start:
    return PROPER_NAME
  return OTHER


def token_class(piece, is_sentinel=False, sentence_start=True):
  """Class of one vocabulary piece read as a whole word (classify_tokens joins a word's pieces)."""
  if is_sentinel or _SENTINEL_RE.match(piece):
    return SENTINEL
  if piece in _CONTROL:
    return OTHER
  return word_class(piece.replace(_WORD_START, "").strip(), sentence_start)


def _words(pieces, sentinel_mask):
  """[(first, end)] piece ranges of the words in `pieces`: a word starts at a piece with the
  word-start mark, or at any piece after a sentinel, control piece or punctuation piece, and runs
  over the pieces that follow it without one; sentinels, control and punctuation pieces stand
  alone."""
  spans = []
  for i, piece in enumerate(pieces):
    text = piece.replace(_WORD_START, "").strip()
    alone = (sentinel_mask[i] or _SENTINEL_RE.match(piece) or piece in _CONTROL or not text
             or _is_punctuation(text))
    joins = (spans and not alone and not piece.startswith(_WORD_START)
             and not spans[-1][2])
    if joins:
      spans[-1][1] = i + 1
    else:
      spans.append([i, i + 1, bool(alone)])
  return [(a, b) for a, b, _ in spans]


def classify_tokens(pieces, sentinel_mask=None):
  """<int32>[N] class index into TOKEN_CLASSES for each piece of a running text.

  The pieces are read in order as text: each word's pieces are joined and the word classified
  (word_class), and all its pieces get its class, so "▁Mi" "khail" are both a proper name and "▁the"
  "ory" ("theory") is not an article. A sentence starts at the first piece, after ". ! ? :", after a
  sentinel and after a control piece such as "</s>".
  """
  if sentinel_mask is None:
    sentinel_mask = [False] * len(pieces)
  classes = np.zeros(len(pieces), dtype=np.int32)
  sentence_start = True
  for first, end in _words(pieces, sentinel_mask):
    piece = pieces[first]
    if end - first == 1:
      name = token_class(piece, bool(sentinel_mask[first]), sentence_start)
    else:
      word = "".join(p.replace(_WORD_START, "") for p in pieces[first:end]).strip()
      name = word_class(word, sentence_start)
    classes[first:end] = TOKEN_CLASSES.index(name)
    last = pieces[end - 1].replace(_WORD_START, "").strip()
    if name == SENTINEL or piece in _CONTROL:
      sentence_start = True
    elif last:
      sentence_start = last.endswith(_SENTENCE_END) and name == PUNCTUATION
  return classes


def mean_entropy_where(router_probs, mask):
  """Mean router entropy over the tokens where `mask` holds (Table 14 uses sentinel tokens only);
  None when no token does."""
  mask = np.asarray(mask, dtype=bool)
  if not mask.any():
    return None
  return mean_router_entropy(np.asarray(router_probs)[mask])


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


def top2_log_margin(router_probs):
  """<float64>[N] ln p(first expert) - ln p(second expert) of each token's router distribution.

  The gap between the two largest router logits (the softmax keeps logit differences): how far a
  token is from swapping its first and second expert; 0 at a tie. A router that has learned little
  leaves most tokens near 0, so small weight updates move them between experts.
  """
  router_probs = np.asarray(router_probs, dtype=np.float64)
  if router_probs.ndim != 2 or router_probs.shape[0] == 0 or router_probs.shape[1] < 2:
    raise ValueError(f"router_probs must be [N, E] with N > 0 and E >= 2, got shape "
                     f"{router_probs.shape}")
  top2 = np.sort(router_probs, axis=-1)[:, -2:]
  tiny = np.finfo(np.float64).tiny
  return np.log(np.maximum(top2[:, 1], tiny)) - np.log(np.maximum(top2[:, 0], tiny))


def first_expert_agreement(top1_a, top1_b):
  """Fraction of tokens whose first expert is the same in two traces of the same tokens (e.g. two
  checkpoints of one run: 1 - StableMoE's "routing fluctuation", Dai et al. 2022)."""
  top1_a, top1_b = np.asarray(top1_a).reshape(-1), np.asarray(top1_b).reshape(-1)
  if top1_a.shape != top1_b.shape or top1_a.size == 0:
    raise ValueError(f"the two traces must route the same tokens: {top1_a.size} and "
                     f"{top1_b.size} first choices")
  return float(np.mean(top1_a == top1_b))


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
