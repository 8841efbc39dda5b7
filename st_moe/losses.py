"""Auxiliary losses of the ST-MoE router, as pure mtf functions.

Each loss has its own coefficient and its own `context.losses` entry in the layer
(L = CE + c_B * L_balance + c_z * L_z, ST-MoE arXiv 2202.08906, section 3): unlike Mesh
TensorFlow's `moe.py`, the z-loss weight is not multiplied by the balance-loss coefficient.

Dimensions cheat sheet: G groups, S tokens per group, E experts.
"""
import mesh_tensorflow as mtf


def load_balance_loss(router_probs, top1_mask, experts_dim, group_dim, nonpadding=None):
  """Load-balancing loss, MTF form: E * sum_e f_e * P_e per group, averaged over groups.

  Switch Transformer (Fedus et al., arXiv 2101.03961, eq. 4-6) as used by ST-MoE
  (arXiv 2202.08906): f_e is the fraction of the group's tokens whose top-1 expert is e and P_e
  the mean router probability of expert e. It is 1 when routing is uniform. Padding tokens add
  nothing to f_e or P_e but, as in MTF, still count in the group size S of both means.

  Args:
    router_probs: <float32>[G, S, E] softmax of the router logits.
    top1_mask: <float32>[G, S, E] one-hot of each token's first choice (before capacity), zero
      for padding.
    experts_dim: E.
    group_dim: S.
    nonpadding: optional <float>[G, S], one for real tokens.

  Returns:
    <float32>[] the loss, before its coefficient.
  """
  probs = mtf.to_float(router_probs)
  if nonpadding is not None:
    probs *= mtf.to_float(nonpadding)
  density = mtf.reduce_mean(mtf.to_float(top1_mask), reduced_dim=group_dim)  # f: [G, E]
  density_proxy = mtf.reduce_mean(probs, reduced_dim=group_dim)  # P: [G, E]
  num_experts = float(experts_dim.size)
  # mean over [G, E] of f * P, times E^2 = mean over groups of E * sum_e f_e P_e.
  return mtf.reduce_mean(density * density_proxy) * (num_experts * num_experts)


def router_z_loss(router_logits, experts_dim, nonpadding=None):
  """Router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, eq. 5).

  L_z = (1/B) sum_i (logsumexp_j x_ij)^2 over the router logits x of the B non-padding tokens:
  it keeps the logits small, so the float32 router stays stable. Without a padding mask every
  token counts (upstream `moe._router_z_loss` raises in that case).

  Args:
    router_logits: <float32>[G, S, E].
    experts_dim: E.
    nonpadding: optional <float>[G, S], one for real tokens.

  Returns:
    <float32>[] the loss, before its coefficient.
  """
  log_z = mtf.reduce_logsumexp(mtf.to_float(router_logits), experts_dim)  # [G, S]
  squared = mtf.square(log_z)
  if nonpadding is None:
    return mtf.reduce_mean(squared)
  weight = mtf.to_float(nonpadding)
  return mtf.reduce_sum(squared * weight) / mtf.maximum(mtf.reduce_sum(weight), 1.0)


def scale(loss, coefficient, num_microbatches=None):
  """coefficient * loss, divided by the number of microbatches the step is split into (MTF)."""
  divisor = float(num_microbatches) if num_microbatches and num_microbatches > 1 else 1.0
  return loss * (float(coefficient) / divisor)

