"""Moving tokens to expert buffers and back, for a RoutingResult: one-hot einsum or index gather.

Both produce expert inputs [E_u, G`, C, M] (groups split like the batch) that the layer then
re-splits over the experts with `mtf.reshape` (an all-to-all on a mesh), and take expert outputs
of that same layout back to the tokens.

  einsum: MTF's representation: einsum with the dense dispatch / combine tensors [G, S, E, C].
    Costs cf * S multiply-adds per token and model unit (a matrix product per group).
  gather: index-based: each group's buffer slots are filled with tf.gather from the tokens (a
    slot -> token table built with a scatter), and each token gathers its k expert outputs back.
    Moves k * M values per token with no multiply-adds; runs inside `mtf.slicewise` per group
    slice, so the group dimension stays split and S is never split.

Dimensions cheat sheet: G groups (split), S tokens per group, E_u experts (unsplit), C capacity,
K selected experts, M model dimension.
"""
import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf

IMPLEMENTATIONS = ("einsum", "gather")


def einsum_dispatch(tokens, result, experts_dim, output_dtype):
  """[G, S, M] x dispatch [G, S, E_u, C] -> <output_dtype>[E_u, G, C, M]."""
  groups_dim, _, model_dim = tokens.shape.dims
  capacity_dim = result.dispatch.shape.dims[-1]
  return mtf.einsum([tokens, mtf.cast(result.dispatch, output_dtype)],
                    output_shape=[experts_dim, groups_dim, capacity_dim, model_dim])


def einsum_combine(expert_outputs, result, group_dim):
  """[E_u, G, C, M] x combine [G, S, E_u, C] -> [G, S, M]."""
  _, groups_dim, _, model_dim = expert_outputs.shape.dims
  return mtf.einsum([expert_outputs, mtf.cast(result.combine, expert_outputs.dtype)],
                    output_shape=[groups_dim, group_dim, model_dim])


def _flat_slots(result, num_experts):
  """<int32>[G, S, K]: expert * C + slot for kept choices, E * C (a dump slot) for the others."""
  capacity = result.capacity
  kept = result.kept
  flat = mtf.to_float(result.expert_index) * float(capacity) + mtf.to_float(result.slot)
  dump = float(num_experts * capacity)
  return mtf.to_int32(kept * flat + (1.0 - kept) * dump)


def _tf_dispatch(tokens, flat_slots, num_experts, capacity):
  """tf: tokens [g, S, M], flat_slots [g, S, K] -> expert inputs [E, g, C, M]."""
  groups, size, depth = tokens.shape.as_list()
  num_slots = num_experts * capacity
  # slot -> token table [g, E*C + 1]; empty slots (and the dump slot) point at a zero row S.
  group_ids = tf.broadcast_to(tf.range(groups)[:, None, None], tf.shape(flat_slots))
  token_ids = tf.broadcast_to(tf.range(size)[None, :, None], tf.shape(flat_slots))
  table = tf.tensor_scatter_nd_update(
      tf.fill([groups, num_slots + 1], size), tf.stack([group_ids, flat_slots], axis=-1),
      token_ids)[:, :num_slots]
  padded = tf.pad(tokens, [[0, 0], [0, 1], [0, 0]])  # [g, S + 1, M]
  buffers = tf.gather(padded, table, axis=1, batch_dims=1)  # [g, E*C, M]
  buffers = tf.reshape(buffers, [groups, num_experts, capacity, depth])
  return tf.transpose(buffers, [1, 0, 2, 3])  # [E, g, C, M]


def _tf_combine(expert_outputs, flat_slots):
  """tf: expert outputs [E, g, C, M], flat_slots [g, S, K] -> [g, S, K, M] (zero if dropped)."""
  num_experts, groups, capacity, depth = expert_outputs.shape.as_list()
  outputs = tf.transpose(expert_outputs, [1, 0, 2, 3])
  outputs = tf.reshape(outputs, [groups, num_experts * capacity, depth])
  outputs = tf.pad(outputs, [[0, 0], [0, 1], [0, 0]])  # dump slot: zeros
  return tf.gather(outputs, flat_slots, axis=1, batch_dims=1)


def gather_dispatch(tokens, result, experts_dim, output_dtype):
  """Index dispatch: [G, S, M] -> <output_dtype>[E_u, G, C, M], same values as einsum_dispatch."""
  groups_dim, _, model_dim = tokens.shape.dims
  capacity_dim = result.dispatch.shape.dims[-1]
  flat_slots = mtf.stop_gradient(_flat_slots(result, experts_dim.size))
  return mtf.slicewise(
      lambda t, f: _tf_dispatch(t, f, experts_dim.size, capacity_dim.size),
      [mtf.cast(tokens, output_dtype), flat_slots],
      output_shape=[experts_dim, groups_dim, capacity_dim, model_dim], output_dtype=output_dtype,
      splittable_dims=[groups_dim, model_dim], name="gather_dispatch")


def gather_combine(expert_outputs, result, group_dim):
  """Index combine: [E_u, G, C, M] -> [G, S, M], same values as einsum_combine."""
  experts_dim, groups_dim, _, model_dim = expert_outputs.shape.dims
  flat_slots = mtf.stop_gradient(_flat_slots(result, experts_dim.size))
  selected_dim = result.gates.shape.dims[-1]
  gathered = mtf.slicewise(
      _tf_combine, [expert_outputs, flat_slots],
      output_shape=[groups_dim, group_dim, selected_dim, model_dim],
      output_dtype=expert_outputs.dtype, splittable_dims=[groups_dim, model_dim],
      name="gather_combine")  # [G, S, K, M]
  weights = mtf.cast(result.gates * result.kept, expert_outputs.dtype)  # [G, S, K]
  return mtf.einsum([gathered, weights], output_shape=[groups_dim, group_dim, model_dim])


DISPATCH = {"einsum": einsum_dispatch, "gather": gather_dispatch}
COMBINE = {"einsum": einsum_combine, "gather": gather_combine}
