"""Token-choice top-k routing for ST-MoE sparse layers, as pure mtf functions (no gin inside).

The router decides, the layer does: `router_logits` projects tokens to one logit per expert in
float32, `route_top_k` turns the logits into a `RoutingResult` (which expert each token goes to,
with which gate, in which buffer slot), and the sparse layer (`st_moe.layers.SparseFFN`) moves the
tokens. The losses live in `st_moe.losses`; `routing_metrics` summarises a routing decision.

Semantics follow Mesh TensorFlow's `_top_2_gating` (the code ST-MoE, arXiv 2202.08906, was trained
with), generalised to any k:
  * softmax over experts in float32; choice i is the argmax of the probabilities not yet chosen;
  * gates of the k chosen experts renormalised to sum to one when k > 1 (or raw probabilities;
    at k = 1 always the raw probability, as MTF's top-1 and the Switch Transformer);
  * choices after the first obey a second-expert policy (all | none | threshold | random);
  * capacity C per expert and group; all first choices take buffer slots before any second
    choice, and so on; overflow is dropped; a token dropped by all its experts gets a zero
    output (the residual connection carries it).

Dimensions cheat sheet:
  G: groups of tokens (named like the batch dimension, so the batch layout rule splits it)
  S: tokens per group ("group")
  E: experts (unsplit here: every token sees all experts)
  C: expert capacity, buffer slots per expert and group ("expert_capacity")
  K: selected experts per token ("selected_experts")
  M: model dimension
"""
import dataclasses
from typing import Dict

import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf

SECOND_POLICIES = ("all", "none", "threshold", "random")
SELECTED_DIM_NAME = "selected_experts"
GROUP_DIM_NAME = "group"
CAPACITY_DIM_NAME = "expert_capacity"


@dataclasses.dataclass
class RoutingResult:
  """A routing decision for one sparse layer call.

  Attributes:
    dispatch: <float32>[G, S, E, C] one where token s of group g takes slot c of expert e.
    combine: <float32>[G, S, E, C] dispatch times the token's gate for that expert.
    expert_index: <int32>[G, S, K] the expert of each choice (whether kept or not).
    gates: <float32>[G, S, K] the gate of each choice (zero for padding).
    kept: <float32>[G, S, K] one where the choice got a buffer slot (not removed by the
      second-expert policy, by capacity or as padding).
    slot: <int32>[G, S, K] the choice's buffer slot in its expert (meaningful where kept).
    router_logits: <float32>[G, S, E].
    router_probs: <float32>[G, S, E] softmax of the logits.
    top1_mask: <float32>[G, S, E] one-hot of each non-padding token's first choice, before
      capacity (the f_e of the balance loss).
    capacity: C, an int.
  """
  dispatch: mtf.Tensor
  combine: mtf.Tensor
  expert_index: mtf.Tensor
  gates: mtf.Tensor
  kept: mtf.Tensor
  slot: mtf.Tensor
  router_logits: mtf.Tensor
  router_probs: mtf.Tensor
  top1_mask: mtf.Tensor
  capacity: int


def expert_capacity(group_size, capacity_factor, num_experts, min_expert_capacity=4,
                    num_selected_experts=1, multiply_by_k=False):
  """Buffer slots per expert and group: max(min(S, int(S * cf [* k] / E)), min_capacity).

  MTF semantics (not multiplied by k) by default: with top-2 and cf 1.25 there are slots for
  1.25 * S of the 2 * S choices, so second choices overflow first. The settings are trusted:
  `st_moe.layers.SparseFFN` checks them once, when it is built.
  """
  factor = capacity_factor * (num_selected_experts if multiply_by_k else 1)
  capacity = min(group_size, int(group_size * factor / num_experts))
  return max(capacity, min_expert_capacity)


def group_tokens(num_tokens, group_size, mesh_dim_size=1):
  """Splits num_tokens into (num_groups, tokens per group), as MTF's `_split_into_groups`.

  Same rule as mesh_tensorflow/transformer/moe.py: the number of groups is the smallest that
  is at least max(1, num_tokens // group_size) (rounded DOWN), is a multiple of the size of the
  mesh dimension the batch is split over, and divides num_tokens. So group_size is a target,
  not a bound: 1,500 tokens at group size 1,024 make one group of 1,500 (a group can hold up to
  twice group_size tokens, less one), and 4,096 tokens make 4 groups of 1,024.
  (tests/routing_test.py checks this against upstream's function.)

  Where upstream silently falls back to groups of one token (nothing between the target and
  num_tokens divides the batch, e.g. 2 x 1,031 tokens at group size 8 over 2 replicas), this
  raises instead: one-token groups make the capacity factor meaningless (every expert has
  min_expert_capacity slots for one token) and are never what the user asked for.

  Args:
    num_tokens: tokens of the batch (all batch and length positions).
    group_size: the target group size, an integer >= 1 (checked by SparseFFN).
    mesh_dim_size: how many ways the batch (hence the groups) is split over the mesh.

  Returns:
    (num_groups, group_size) with num_groups * group_size == num_tokens.

  Raises:
    ValueError: num_tokens not a multiple of mesh_dim_size, or the only split left is groups of
      one token although group_size > 1 and num_tokens > mesh_dim_size.
  """
  if num_tokens % mesh_dim_size:
    raise ValueError(f"the batch has {num_tokens} tokens, not a multiple of {mesh_dim_size}, the "
                     "size of the mesh dimension the batch is split over: choose a batch size "
                     "and length whose product it divides")
  num_groups = max(1, num_tokens // group_size)
  while num_groups % mesh_dim_size or num_tokens % num_groups:
    num_groups += 1
  if num_groups == num_tokens and group_size > 1 and num_tokens > mesh_dim_size:
    # The largest valid number of groups below num_tokens (mesh_dim_size itself is valid).
    fewer = max(g for g in range(mesh_dim_size, num_tokens, mesh_dim_size)
                if num_tokens % g == 0)
    raise ValueError(
        f"routing groups: the batch has {num_tokens} tokens (batch x length), and with "
        f"group_size={group_size} over a mesh dimension of size {mesh_dim_size} no number of "
        f"groups between {max(1, num_tokens // group_size)} and {num_tokens} is a multiple of "
        f"{mesh_dim_size} dividing {num_tokens}, which would leave groups of one token. What "
        f"works: st_moe.SparseFFN.group_size >= {num_tokens // (fewer + 1) + 1} ({fewer} groups "
        f"of {num_tokens // fewer} tokens), or a batch size x length with small factors (e.g. "
        "powers of two)")
  return num_groups, num_tokens // num_groups


ROUTER_PRECISIONS = ("float32", "bfloat16")


def round_to_bfloat16(x):
  """<float32> x rounded to the nearest bfloat16 value (8 significant bits), kept in float32.

  Emulates a bfloat16 computation's round-off where the CPU has no bfloat16 kernel; the gradient
  passes through the two casts unchanged.
  """
  return mtf.cast(mtf.cast(x, tf.bfloat16), tf.float32)


def router_logits(inputs, experts_dim, init_stddev=2e-2, jitter_eps=0.0, train=False,
                  master_dtype=tf.float32, slice_dtype=tf.float32, name="router",
                  precision="float32"):
  """Router logits from a bias-free projection, in float32 whatever the inputs' dtype.

  ST-MoE "selective precision": the router runs in float32 even under bfloat16 activations
  (precision "float32", the default). Precision "bfloat16" is what selective precision avoids: the
  router's inputs and logits carry bfloat16 round-off (each rounded to 8 significant bits; the
  product itself in float32), and `route_top_k` then rounds the softmax's exponentials, so large
  logits lose precision as in the paper's unstable runs (ST-MoE Sec. 3.3).

  Args:
    inputs: <any float>[G, S, M] tokens.
    experts_dim: E, the (unsplit) experts dimension of the logits.
    init_stddev: the router kernel is initialised normal(0, init_stddev).
    jitter_eps: in training, inputs are multiplied by U[1 - eps, 1 + eps] (0 turns it off).
    train: whether this is a training graph.
    master_dtype, slice_dtype: the kernel's variable dtypes.
    name: variable scope of the kernel (`<name>/kernel`, shape [M, E]).
    precision: "float32" or "bfloat16" (see above).

  Returns:
    <float32>[G, S, E] (values on the bfloat16 grid at precision "bfloat16").
  """
  x = mtf.to_float(inputs)
  if train and jitter_eps > 0.0:
    x *= mtf.random_uniform(x.mesh, x.shape, minval=1.0 - jitter_eps, maxval=1.0 + jitter_eps)
  if precision == "bfloat16":
    x = round_to_bfloat16(x)
  logits = mtf.layers.dense(
      x, experts_dim, reduced_dims=x.shape.dims[-1:], use_bias=False,
      variable_dtype=mtf.VariableDType(master_dtype, slice_dtype, tf.float32),
      kernel_initializer=tf.random_normal_initializer(stddev=init_stddev), name=name)
  return round_to_bfloat16(logits) if precision == "bfloat16" else logits


def _tf_positions(mask, order=None):
  """tf: exclusive cumulative sum of mask [g, S, E] along S, in the token order `order` [g, S]."""
  if order is None:
    return tf.math.cumsum(mask, axis=1, exclusive=True)
  sorted_mask = tf.gather(mask, order, axis=1, batch_dims=1)
  sorted_positions = tf.math.cumsum(sorted_mask, axis=1, exclusive=True)
  return tf.gather(sorted_positions, tf.argsort(order, axis=1), axis=1, batch_dims=1)


def positions_in_experts(mask, group_dim, order=None):
  """Number of earlier tokens of the group sent to the same expert (exclusive cumsum over S).

  A real cumulative sum inside `mtf.slicewise` (the group dimension is never split), not
  `mtf.cumsum`, which is an S x S matrix product.

  Args:
    mask: <float32>[G, S, E] one where the token is sent to the expert.
    group_dim: S.
    order: optional <int32>[G, S], token indices from highest to lowest priority
      (batch-prioritized routing); None means the order of the tokens in the group.

  Returns:
    <float32>[G, S, E].
  """
  outer = [d for d in mask.shape.dims if d != group_dim]
  mask = mtf.transpose(mask, [outer[0], group_dim] + outer[1:])
  inputs = [mtf.stop_gradient(mask)]
  if order is not None:
    order = mtf.transpose(order, [outer[0], group_dim])
    inputs.append(order)
    fn = _tf_positions
  else:
    fn = lambda m: _tf_positions(m)  # pylint: disable=unnecessary-lambda
  return mtf.slicewise(fn, inputs, output_shape=mask.shape, output_dtype=tf.float32,
                       splittable_dims=outer, name="positions_in_experts")


def priority_order(priority, group_dim):
  """<int32>[G, S]: token indices by descending priority (stable), per group."""
  outer = [d for d in priority.shape.dims if d != group_dim]
  priority = mtf.transpose(mtf.stop_gradient(priority), outer + [group_dim])
  return mtf.slicewise(
      lambda p: tf.argsort(-p, axis=-1, stable=True), [priority], output_shape=priority.shape,
      output_dtype=tf.int32, splittable_dims=outer, name="priority_order")


def _second_policy_mask(policy, gate, threshold, train_rng_mesh):
  """<float32>[G, S] (or None: keep all): which non-first choices the second-expert policy keeps."""
  if policy == "none":
    return mtf.zeros_like(gate)
  if policy == "threshold":
    return mtf.to_float(mtf.greater(gate, threshold))
  if policy == "random":
    # Keep with probability min(1, gate / threshold).
    uniform = mtf.random_uniform(train_rng_mesh, gate.shape, dtype=tf.float32)
    return mtf.to_float(mtf.less(uniform, gate / threshold))
  return None  # "all"


def route_top_k(logits, experts_dim, group_dim, capacity, num_selected_experts=2,
                nonpadding=None, second_policy="random", second_threshold=0.2,
                renormalize_gates=True, batch_prioritized=False, precision="float32"):
  """Token-choice top-k routing with capacity (MTF `_top_2_gating` semantics, any k).

  Args:
    logits: <float32>[G, S, E] router logits.
    experts_dim: E (in logits).
    group_dim: S (in logits).
    capacity: C, buffer slots per expert and group (see `expert_capacity`).
    num_selected_experts: k, 1 <= k <= E.
    nonpadding: optional <float>[G, S], one for real tokens and zero for padding. Padding is
      routed nowhere and counts in no loss.
    second_policy: all | none | threshold | random, applied to every choice after the first:
      keep always, never, when its gate exceeds second_threshold, or with probability
      min(1, gate / second_threshold).
    second_threshold: the threshold of the threshold and random policies.
    renormalize_gates: gates of the k choices divided by their sum (MTF), when k > 1; else (and
      always at k = 1, as MTF) raw probabilities.
    batch_prioritized: buffer slots go to tokens in order of decreasing top-1 probability
      instead of their order in the group (encoders only: it looks at later tokens).
    precision: "float32", or "bfloat16": the softmax's exponentials and probabilities rounded to
      bfloat16 (`router_logits`'s precision "bfloat16").

  Returns:
    a RoutingResult.

  The settings are trusted (1 <= k <= E, a policy of SECOND_POLICIES, a threshold in (0, 1]):
  `st_moe.layers.SparseFFN` checks them once, when it is built.
  """
  logits = mtf.to_float(logits)
  if precision == "bfloat16":
    # softmax with bfloat16 exponentials: exp(logit - max) rounded, then normalised and rounded.
    shifted = logits - mtf.stop_gradient(mtf.reduce_max(logits, reduced_dim=experts_dim))
    exps = round_to_bfloat16(mtf.exp(shifted))
    probs = round_to_bfloat16(exps / mtf.reduce_sum(exps, reduced_dim=experts_dim))
  else:
    probs = mtf.softmax(logits, experts_dim)  # [G, S, E]
  if nonpadding is not None:
    nonpadding = mtf.to_float(nonpadding)  # [G, S]

  # CHOOSE k EXPERTS PER TOKEN: choice i is the argmax of the probabilities not yet chosen.
  remaining = probs
  gates, indices, onehots = [], [], []
  for i in range(num_selected_experts):
    gate, index = mtf.top_1(remaining, experts_dim)  # [G, S], [G, S]
    onehot = mtf.one_hot(index, experts_dim, dtype=tf.float32)  # [G, S, E]
    if nonpadding is not None:
      gate *= nonpadding
    gates.append(gate)
    indices.append(index)
    onehots.append(onehot)
    if i + 1 < num_selected_experts:
      remaining = remaining * (1.0 - onehot) - onehot  # chosen experts sink below any prob.
  top1_mask = onehots[0] if nonpadding is None else onehots[0] * nonpadding
  if renormalize_gates and num_selected_experts > 1:
    # Not at k = 1: g / g would be 1 for every token, a constant through which the task loss sends
    # the router no gradient. Top-1 keeps the raw probability (MTF's _top_n_gating and
    # _switch_gating, the Switch Transformer).
    denom = mtf.add_n(gates) + 1e-9
    gates = [g / denom for g in gates]

  # WHICH CHOICES TRY FOR A SLOT: padding never; after the first, the second-expert policy.
  masks = []
  for i, onehot in enumerate(onehots):
    mask = onehot if nonpadding is None else onehot * nonpadding
    if i > 0:
      keep = _second_policy_mask(second_policy, gates[i], second_threshold, logits.mesh)
      if keep is not None:
        mask *= keep
    masks.append(mask)

  # BUFFER SLOTS: every first choice before any second choice; overflow dropped.
  order = None
  if batch_prioritized:
    order = priority_order(mtf.reduce_max(probs, reduced_dim=experts_dim), group_dim)
  capacity_dim = mtf.Dimension(CAPACITY_DIM_NAME, capacity)
  count = None  # [G, E] slots taken so far
  combine, dispatch, kept, slots = [], [], [], []
  for gate, mask in zip(gates, masks):
    position = positions_in_experts(mask, group_dim, order)  # [G, S, E]
    if count is not None:
      position += count
    fits = mask * mtf.to_float(mtf.less(position, float(capacity)))  # [G, S, E]
    count = mtf.reduce_sum(fits, reduced_dim=group_dim) + (0.0 if count is None else count)
    slot = mtf.to_int32(mtf.reduce_sum(position * fits, reduced_dim=experts_dim))  # [G, S]
    slot_onehot = mtf.one_hot(slot, capacity_dim, dtype=tf.float32)  # [G, S, C]
    dispatch_i = fits * slot_onehot  # [G, S, E, C]
    dispatch.append(dispatch_i)
    combine.append(dispatch_i * gate)
    kept.append(mtf.reduce_sum(fits, reduced_dim=experts_dim))  # [G, S]
    slots.append(slot)
  return RoutingResult(
      dispatch=mtf.add_n(dispatch),
      combine=mtf.add_n(combine),
      expert_index=mtf.stack(indices, SELECTED_DIM_NAME, axis=-1),
      gates=mtf.stack(gates, SELECTED_DIM_NAME, axis=-1),
      kept=mtf.stack(kept, SELECTED_DIM_NAME, axis=-1),
      slot=mtf.stack(slots, SELECTED_DIM_NAME, axis=-1),
      router_logits=logits,
      router_probs=probs,
      top1_mask=top1_mask,
      capacity=capacity)


def routing_metrics(result, experts_dim, nonpadding=None) -> Dict[str, mtf.Tensor]:
  """Scalar metrics of a routing decision, averaged over non-padding tokens.

  Args:
    result: a RoutingResult.
    experts_dim: E.
    nonpadding: optional <float>[G, S].

  Returns:
    a dict of mtf scalars:
      fraction_dropped: fraction of tokens that got no buffer slot at all;
      slots_per_token: the layer's buffer slots per token of a group, E x C / S (a constant): a
        router however balanced drops at least 1 - slots_per_token of the tokens when it is
        below 1 (top-1 at capacity factor 0.75: a quarter), which the collapse rule
        (st_moe.experiments.divergence) discounts;
      confidence: mean top-1 router probability;
      entropy: mean routing entropy -sum_e p_e log p_e (nats);
      max_logit: the largest router logit of a non-padding token (what the router z-loss keeps
        small; bfloat16 round-off grows with it);
      expert_fraction/NN: fraction of tokens whose first choice is expert NN (before capacity).
  """
  probs = result.router_probs
  if nonpadding is None:
    weight = mtf.ones(probs.mesh, probs.shape - experts_dim, tf.float32)
  else:
    weight = mtf.to_float(nonpadding)
  num_tokens = mtf.maximum(mtf.reduce_sum(weight), 1.0)
  selected_dim = result.kept.shape.dims[-1]
  routed = mtf.minimum(mtf.reduce_sum(result.kept, reduced_dim=selected_dim), 1.0)  # [G, S]
  log_probs = mtf.log_softmax(result.router_logits, experts_dim)
  entropy = -mtf.reduce_sum(probs * log_probs, reduced_dim=experts_dim)  # [G, S]
  group_size = result.dispatch.shape.dims[1].size
  metrics = {
      "fraction_dropped": mtf.reduce_sum(weight * (1.0 - routed)) / num_tokens,
      "slots_per_token": mtf.constant(
          probs.mesh, experts_dim.size * result.capacity / group_size, dtype=tf.float32),
      "confidence": mtf.reduce_sum(weight * mtf.reduce_max(probs, reduced_dim=experts_dim))
                    / num_tokens,
      "entropy": mtf.reduce_sum(weight * entropy) / num_tokens,
      # Padding tokens count as -1e30, below any real logit.
      "max_logit": mtf.reduce_max(
          weight * mtf.reduce_max(result.router_logits, reduced_dim=experts_dim)
          - (1.0 - weight) * 1e30),
  }
  fractions = mtf.reduce_sum(result.top1_mask, output_shape=[experts_dim]) / num_tokens
  width = max(2, len(str(experts_dim.size - 1)))
  for e, fraction in enumerate(mtf.split(fractions, experts_dim, experts_dim.size)):
    metrics[f"expert_fraction/{e:0{width}d}"] = mtf.reduce_sum(fraction)
  return metrics
