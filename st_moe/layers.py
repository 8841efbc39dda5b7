"""The ST-MoE sparse feed-forward layer (`st_moe.SparseFFN`) for `mesh_tensorflow.transformer`.

`SparseFFN` is a `TransformerLayer`: `__init__` records and checks the settings (its keyword
arguments are the gin surface), `call(context, x)` routes the tokens (`st_moe.routing`), runs the
experts, adds the balance loss and the router z-loss to `context.losses` as two entries
(`st_moe.losses`), writes router summaries and records the routing for the routing tracer.

Layout: tokens arrive split over the batch; the expert weights carry an experts dimension
(`experts_dim_name`, "experts" by default) that a layout rule may split over a mesh dimension.
Dispatch goes batch-split [G`, E, C, M] -> expert-split [E`, G, C, M] by `mtf.reshape`, which is an
all-to-all on a mesh when both are split over the same mesh dimension; combine goes back the same
way.

Dimensions cheat sheet:
  B: batch dim(s); L: length; M: d_model
  G: groups (named like the batch dim, split with it); S: tokens per group ("group")
  E: experts ("experts", may be split) and E_u: the same size unsplit ("experts_unsplit")
  C: expert capacity; H: expert hidden size ("expert_hidden"); K: selected experts

Routing export: every call records a `RoutingRecord` on the mtf graph; after building the graph,
`routing_records(graph)` lists them (layer name; expert index, gate and kept flag of each token's
k choices as mtf tensors [B..., L, K]; router probabilities [B..., L, E]; scalar metrics). A tool
lowers the graph and exports those tensors with `lowering.export_to_tf_tensor`.
"""
import dataclasses
import functools
from typing import Dict, List

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import tensorflow.compat.v1 as tf

from st_moe import dispatch as dispatch_lib
from st_moe import losses as losses_lib
from st_moe import routing

_RECORDS_ATTR = "_st_moe_routing_records"


@dataclasses.dataclass
class RoutingRecord:
  """The routing of one SparseFFN call, as mtf tensors of the graph it was built in.

  Attributes:
    name: the layer's variable scope, e.g. "encoder/block_003/sparse_ffn/SparseFFN".
    expert_index: <int32>[B..., L, K] expert of each of the token's k choices.
    gates: <float32>[B..., L, K] the gate of each choice.
    kept: <float32>[B..., L, K] one if the choice got a buffer slot (zero: dropped by
      capacity, by the second-expert policy, or padding).
    router_probs: <float32>[B..., L, E] the router's softmax.
    metrics: {name: <float32>[] mtf scalar}: balance_loss, z_loss (before their coefficients)
      and the routing metrics of `st_moe.routing.routing_metrics`.
  """
  name: str
  expert_index: mtf.Tensor
  gates: mtf.Tensor
  kept: mtf.Tensor
  router_probs: mtf.Tensor
  metrics: Dict[str, mtf.Tensor]


def routing_records(graph) -> List[RoutingRecord]:
  """The RoutingRecords of every SparseFFN call built in `graph` (an mtf.Graph), in call order."""
  return list(getattr(graph, _RECORDS_ATTR, []))


def _mesh_axis(layout, mesh_shape, dim):
  """Index of the mesh dimension `dim` is split over, or None (also without a layout)."""
  if layout is None or mesh_shape is None:
    return None
  return mtf.convert_to_layout_rules(layout).tensor_dimension_to_mesh_axis(
      dim, mtf.convert_to_shape(mesh_shape))


def _mesh_dim_size(layout, mesh_shape, dim):
  """How many ways `dim` is split over the mesh (1 if not split or without a layout)."""
  axis = _mesh_axis(layout, mesh_shape, dim)
  return 1 if axis is None else mtf.convert_to_shape(mesh_shape).dims[axis].size


def _check_activation(activation):
  if isinstance(activation, (str,)) or callable(activation):
    activation = [activation]
  activation = list(activation)
  if not activation:
    raise ValueError("activation=[]: give at least one activation, e.g. ('gelu', 'linear')")
  for a in activation:
    if isinstance(a, str) and a != "linear" and not callable(getattr(mtf, a, None)):
      raise ValueError(f"activation {a!r}: not 'linear' nor a function of mesh_tensorflow "
                       "(e.g. 'gelu', 'relu')")
    if not isinstance(a, str) and not callable(a):
      raise ValueError(f"activation {a!r}: expected a name or a function")
  return activation


class ExpertEinsum(mtf.EinsumOperation):
  """x [E, G, C, D_in] times kernel [E, D_in, D_out] -> [E, G, C, D_out], per expert.

  Lowers like `mtf.einsum`; only the kernel gradient differs: mtf writes it as
  einsum([dy, x]), which TF's CPU einsum computes as [E, D_out, D_in] and then transposes (the
  size of the expert weights: 3.4x slower at 64 experts of 512 x 2048), while einsum([x, dy])
  produces [E, D_in, D_out] directly. Same products and sums (the forward is untouched).
  """

  def gradient(self, grad_ys):
    dy = grad_ys[0]
    x, kernel = self.inputs
    return [mtf.einsum([dy, kernel], output_shape=x.shape),
            mtf.einsum([x, dy], output_shape=kernel.shape)]


def expert_dense(x, reduced_dim, new_dim, experts_dim, variable_dtype, name):
  """`mtf.layers.dense(x, new_dim, [reduced_dim], expert_dims=[experts_dim], use_bias=False)`.

  Same variable (`<name>/kernel` [E, reduced, new], mtf's default initialiser) and forward
  arithmetic, built on `ExpertEinsum`.

  Args:
    x: [E, G, C, reduced_dim] expert buffers.
    reduced_dim, new_dim: input and output feature dimensions.
    experts_dim: E.
    variable_dtype: mtf.VariableDType of the kernel.
    name: variable scope of the kernel.

  Returns:
    [E, G, C, new_dim] in x's dtype.
  """
  kernel = mtf.layers.get_dense_kernel_weights(
      x, [new_dim], [reduced_dim], [experts_dim], None, name, variable_dtype)
  output_shape = mtf.Shape([d for d in x.shape.dims if d != reduced_dim] + [new_dim])
  with tf.variable_scope(name):
    y = ExpertEinsum([x, kernel], output_shape, name="einsum").outputs[0]
    if mtf.layers.unit_scaling_convention():
      y *= reduced_dim.size ** -0.5
  return y


@gin.configurable(module="st_moe")
class SparseFFN(transformer.TransformerLayer):
  """ST-MoE sparse FFN: float32 router, top-k dispatch with capacity, GEGLU experts."""

  def __init__(self,
               num_experts=32,
               hidden_size=2816,
               activation=("gelu", "linear"),
               num_selected_experts=2,
               capacity_factor_train=1.25,
               capacity_factor_eval=2.0,
               capacity_factor_decode=None,
               min_expert_capacity=4,
               capacity_multiply_by_k=False,
               group_size=1024,
               second_policy_train="random",
               second_policy_eval="all",
               second_threshold_train=0.2,
               second_threshold_eval=0.2,
               renormalize_gates=True,
               balance_loss_coef=1e-2,
               router_z_loss_coef=1e-3,
               router_init_stddev=2e-2,
               router_jitter_eps=0.0,
               router_precision="float32",
               batch_prioritized_routing=False,
               expert_dropout_rate=0.0,
               multiplicative_bias=False,
               additive_bias=False,
               experts_dim_name="experts",
               dispatch="gather"):
    """Records and checks the settings.

    Args:
      num_experts: E, experts in the layer.
      hidden_size: H, hidden units of each expert.
      activation: activations multiplied together on the hidden layer (GEGLU: gelu x linear);
        names of mesh_tensorflow functions or "linear", or functions.
      num_selected_experts: k, experts per token (1 <= k <= E).
      capacity_factor_train, capacity_factor_eval: capacity factors (> 0) in training and in
        full-sequence evaluation (scoring, the encoder, teacher-forced passes).
      capacity_factor_decode: capacity of a decoding step (transformer context mode
        "incremental": Bitransformer.decode, beam search, sample_autoregressive). Such a step
        routes only batch x beam tokens, one per sequence, so with a capacity factor the floor
        min_expert_capacity, not the factor, would decide what is dropped. None (the default):
        capacity = the step's tokens per group, so no decoding step drops a token whatever the
        router does (each expert's buffer can hold every token of the group: E x S slots
        instead of cf x S, on a step of one position; at small decoding batches the floor
        min_expert_capacity already gives S). A float > 0: max(min(S, int(S * cf / E)),
        min_expert_capacity), as in training.
      min_expert_capacity: smallest buffer per expert and group (1 <= it <= group_size).
      capacity_multiply_by_k: capacity int(S * cf * k / E) instead of MTF's int(S * cf / E).
      group_size: target number of tokens per routing group (>= 1), split as MTF's
        `_split_into_groups` does (`st_moe.routing.group_tokens`).
      second_policy_train, second_policy_eval: all | none | threshold | random, for choices
        after the first. Training keeps MTF's and the paper's "random" (keep the second expert
        with probability min(1, g2 / threshold)). Evaluation and decoding default to "all", so
        that scoring, evaluation and decoding are deterministic: the same checkpoint gives the
        same metrics twice. Of the deterministic policies, "all" is the closest to the random
        policy's expected output g1 E1 + min(1, g2 / t) g2 E2: it differs from it by at most
        t / 4 x |E2| (at g2 = t / 2), "threshold" by up to t x |E2| (g2 just below t), "none"
        by g2 x |E2|. It is also what flaxformer's ST-MoE router (TokensChooseMaskedRouter)
        does in training and evaluation. MTF's default for evaluation is "random".
      second_threshold_train, second_threshold_eval: threshold t of the threshold and random
        policies, in (0, 1] (ignored by all and none).
      renormalize_gates: the k gates sum to one (MTF); else raw router probabilities. Only for
        k > 1: at k = 1 the gate is always the raw probability (MTF, the Switch Transformer),
        since a renormalised single gate is 1 and would pass the router no gradient of the loss.
      balance_loss_coef: c_B, weight of the load-balancing loss (0 turns it off).
      router_z_loss_coef: c_z, weight of the router z-loss (applied directly, not times c_B).
      router_init_stddev: stddev of the normal initialiser of the router kernel.
      router_jitter_eps: multiplicative router-input jitter in training (0 turns it off).
      router_precision: "float32" (ST-MoE's selective precision: the router in float32 whatever
        the activations) or "bfloat16" (the router's inputs, logits and softmax carry bfloat16
        round-off, emulated by casts: the unstable setting of the paper's Sec. 3.3).
      batch_prioritized_routing: slots by decreasing top-1 probability; encoders only.
      expert_dropout_rate: dropout on the experts' hidden layer in training (fine-tuning knob,
        separate from the model's dropout).
      multiplicative_bias: a learned [E, H] vector, initialised to ones, scales the hidden layer
        (the paper's Table 17: [(GELU(x W11) * (x W12)) * B] W2).
      additive_bias: a learned [E, H] vector, initialised to zeros, added to the hidden layer at
        the same place (Table 17's additive variant). Either, both or neither.
      experts_dim_name: name of the experts dimension of the expert weights (for layout rules).
      dispatch: how tokens move to the expert buffers and back: "gather" (index gather/scatter,
        the default: no S x E x C matrix products, fastest on CPU, see docs/performance.md) or
        "einsum" (MTF's one-hot matrix products, the TPU-friendly form; bind
        `st_moe.SparseFFN.dispatch = "einsum"` for TPU runs). Same results (st_moe.dispatch).

    The router summaries (`<scope>/router/...`) reach the event files in training and evaluation,
    on the CPU and on a TPU, through `st_moe.summaries` (installed by `st_moe.register`).

    Raises:
      ValueError: on a setting that cannot work, naming it.
    """
    # Every setting is checked here, once; st_moe.routing trusts what the layer passes it.
    if not isinstance(num_experts, int) or num_experts < 1:
      raise ValueError(f"num_experts={num_experts!r}: must be an integer >= 1")
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
      raise ValueError(f"hidden_size={hidden_size!r}: the experts' hidden size must be an "
                       "integer >= 1 (ST-MoE: d_ff, 2816 for ST-MoE-L)")
    if not isinstance(num_selected_experts, int) or not 1 <= num_selected_experts <= num_experts:
      raise ValueError(f"num_selected_experts={num_selected_experts!r}: must be an integer "
                       f"between 1 and num_experts={num_experts}")
    for name, value in (("capacity_factor_train", capacity_factor_train),
                        ("capacity_factor_eval", capacity_factor_eval)):
      if not value > 0:
        raise ValueError(f"{name}={value!r}: the capacity factor must be > 0 "
                         "(ST-MoE: 1.25 in training, 2.0 in evaluation)")
    if capacity_factor_decode is not None and not capacity_factor_decode > 0:
      raise ValueError(f"capacity_factor_decode={capacity_factor_decode!r}: must be > 0, or None "
                       "(a decoding step drops no token)")
    for name, value in (("second_policy_train", second_policy_train),
                        ("second_policy_eval", second_policy_eval)):
      if value not in routing.SECOND_POLICIES:
        raise ValueError(f"{name}={value!r}: expected one of {routing.SECOND_POLICIES}")
    for policy, name, value in (
        (second_policy_train, "second_threshold_train", second_threshold_train),
        (second_policy_eval, "second_threshold_eval", second_threshold_eval)):
      if policy in ("threshold", "random") and not (
          isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name}={value!r} with the {policy!r} second-expert policy: the "
                         "threshold must be in (0, 1], a gate of the renormalised top-k "
                         "(ST-MoE and MTF: 0.2)")
    if dispatch not in dispatch_lib.IMPLEMENTATIONS:
      raise ValueError(f"dispatch={dispatch!r}: expected one of {dispatch_lib.IMPLEMENTATIONS}")
    if not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f"group_size={group_size!r}: must be an integer >= 1 (MTF default 1024)")
    if not isinstance(min_expert_capacity, int) or min_expert_capacity < 1:
      raise ValueError(f"min_expert_capacity={min_expert_capacity!r}: must be an integer >= 1")
    if min_expert_capacity > group_size:
      raise ValueError(f"min_expert_capacity={min_expert_capacity} is larger than "
                       f"group_size={group_size}, the routing group: every expert would get more "
                       "buffer slots than a group has tokens; use min_expert_capacity <= "
                       f"{group_size} (MTF and ST-MoE: 4) or a larger group_size")
    if not 0.0 <= expert_dropout_rate < 1.0:
      raise ValueError(f"expert_dropout_rate={expert_dropout_rate!r}: must be in [0, 1)")
    if not 0.0 <= router_jitter_eps < 1.0:
      raise ValueError(f"router_jitter_eps={router_jitter_eps!r}: must be in [0, 1)")
    if router_precision not in routing.ROUTER_PRECISIONS:
      raise ValueError(f"router_precision={router_precision!r}: must be one of "
                       f"{', '.join(map(repr, routing.ROUTER_PRECISIONS))} (float32: ST-MoE's "
                       "selective precision)")
    for name, value in (("balance_loss_coef", balance_loss_coef),
                        ("router_z_loss_coef", router_z_loss_coef),
                        ("router_init_stddev", router_init_stddev)):
      if value < 0:
        raise ValueError(f"{name}={value!r}: must be >= 0")
    self.num_experts = num_experts
    self.hidden_size = hidden_size
    self.activation = _check_activation(activation)
    self.num_selected_experts = num_selected_experts
    self.capacity_factor_train = capacity_factor_train
    self.capacity_factor_eval = capacity_factor_eval
    self.capacity_factor_decode = capacity_factor_decode
    self.min_expert_capacity = min_expert_capacity
    self.capacity_multiply_by_k = capacity_multiply_by_k
    self.group_size = group_size
    self.second_policy_train = second_policy_train
    self.second_policy_eval = second_policy_eval
    self.second_threshold_train = second_threshold_train
    self.second_threshold_eval = second_threshold_eval
    self.renormalize_gates = renormalize_gates
    self.balance_loss_coef = balance_loss_coef
    self.router_z_loss_coef = router_z_loss_coef
    self.router_init_stddev = router_init_stddev
    self.router_jitter_eps = router_jitter_eps
    self.router_precision = router_precision
    self.batch_prioritized_routing = batch_prioritized_routing
    self.expert_dropout_rate = expert_dropout_rate
    self.multiplicative_bias = multiplicative_bias
    self.additive_bias = additive_bias
    self.experts_dim_name = experts_dim_name
    self.dispatch = dispatch

  def capacity(self, group_size, train, decoding=False):
    """C, buffer slots per expert for routing groups of group_size tokens.

    Args:
      group_size: S, tokens per routing group of this call.
      train: whether this is a training graph (capacity_factor_train, else capacity_factor_eval).
      decoding: whether this is a decoding step (context mode "incremental"): then
        capacity_factor_decode, and with its default None, C = S (no token dropped).

    Returns:
      an int.
    """
    if decoding and not train and self.capacity_factor_decode is None:
      return group_size
    if decoding and not train:
      factor = self.capacity_factor_decode
    else:
      factor = self.capacity_factor_train if train else self.capacity_factor_eval
    return routing.expert_capacity(group_size, factor, self.num_experts,
                                   self.min_expert_capacity, self.num_selected_experts,
                                   self.capacity_multiply_by_k)

  def check_decoder(self):
    """Raises if the layer cannot be used in an autoregressive decoder."""
    if self.batch_prioritized_routing:
      raise ValueError("batch_prioritized_routing=True in a decoder: the priority sort looks at "
                       "later tokens, which breaks autoregressive decoding; set it to False for "
                       "decoder sparse layers")

  def call(self, context, x, losses=None):
    """Applies the sparse FFN.

    Args:
      context: a transformer.Context.
      x: <activation dtype>[B..., L, M] (or [B..., M] in incremental decoding).
      losses: unused (MTF signature).

    Returns:
      <activation dtype> tensor of the shape of x.
    """
    del losses
    model = context.model
    if getattr(model, "ensemble_dim", None):
      raise NotImplementedError("SparseFFN does not support ensembles (ensemble_dim)")
    if getattr(model, "autoregressive", False):
      self.check_decoder()
    layout, mesh_shape = getattr(model, "layout", None), getattr(model, "mesh_shape", None)
    x_shape = x.shape
    if context.length_dim not in x_shape.dims:  # incremental decoding: one position
      x = mtf.reshape(x, x_shape.dims[:-1] + [mtf.Dimension("length", 1), x_shape.dims[-1]])
    batch_and_length_dims, model_dim = x.shape.dims[:-1], x.shape.dims[-1]
    batch_dim = batch_and_length_dims[0]
    experts_dim = mtf.Dimension(self.experts_dim_name, self.num_experts)
    experts_mesh_size = _mesh_dim_size(layout, mesh_shape, experts_dim)
    if self.num_experts % experts_mesh_size:
      raise ValueError(f"num_experts={self.num_experts} is not divisible by {experts_mesh_size}, "
                       f"the size of the mesh dimension '{self.experts_dim_name}' is split over: "
                       "use a multiple of it")
    batch_mesh_size = _mesh_dim_size(layout, mesh_shape, batch_dim)
    num_groups, group_size = routing.group_tokens(
        mtf.Shape(batch_and_length_dims).size, self.group_size, batch_mesh_size)
    groups_dim = mtf.Dimension(batch_dim.name, num_groups)
    group_dim = mtf.Dimension(routing.GROUP_DIM_NAME, group_size)
    experts_unsplit_dim = mtf.Dimension(self.experts_dim_name + "_unsplit", self.num_experts)
    # On the expert side the groups stay split over the batch's mesh dimension unless the experts
    # take that same mesh dimension (then dispatch is an all-to-all): no replicated expert work.
    if _mesh_axis(layout, mesh_shape, experts_dim) == _mesh_axis(layout, mesh_shape, batch_dim):
      expert_groups_dim = mtf.Dimension(batch_dim.name + "_unsplit", num_groups)
    else:
      expert_groups_dim = groups_dim

    tokens = mtf.reshape(x, [groups_dim, group_dim, model_dim])  # [B..., L, M] -> [G, S, M]
    nonpadding = context.nonpadding
    if isinstance(nonpadding, mtf.Tensor):
      nonpadding = mtf.zeros(x.mesh, batch_and_length_dims, tf.float32) + mtf.to_float(nonpadding)
      nonpadding = mtf.reshape(nonpadding, [groups_dim, group_dim])  # [G, S]
    else:
      nonpadding = None  # None (no sequence ids) or 1 (all real tokens)

    train = context.train
    capacity = self.capacity(group_size, train, decoding=context.mode == "incremental")
    logits = routing.router_logits(
        tokens, experts_unsplit_dim, init_stddev=self.router_init_stddev,
        jitter_eps=self.router_jitter_eps, train=train,
        master_dtype=context.variable_dtype.master_dtype,
        slice_dtype=context.variable_dtype.slice_dtype,
        precision=self.router_precision)  # [G, S, E_u] float32
    result = routing.route_top_k(
        logits, experts_unsplit_dim, group_dim, capacity, self.num_selected_experts,
        nonpadding=nonpadding,
        second_policy=self.second_policy_train if train else self.second_policy_eval,
        second_threshold=self.second_threshold_train if train else self.second_threshold_eval,
        renormalize_gates=self.renormalize_gates,
        batch_prioritized=self.batch_prioritized_routing, precision=self.router_precision)
    capacity_dim = result.dispatch.shape.dims[-1]

    # DISPATCH: [G`, S, M] x [G`, S, E_u, C] -> [E_u, G`, C, M] -> (all-to-all) [E`, G_u, C, M]
    # (when experts and batch share a mesh dimension; else [E`, G`, C, M], no communication)
    expert_inputs = dispatch_lib.DISPATCH[self.dispatch](
        tokens, result, experts_unsplit_dim, x.dtype)  # [E_u, G`, C, M]
    expert_inputs = mtf.reshape(
        expert_inputs, [experts_dim, expert_groups_dim, capacity_dim, model_dim])
    expert_outputs = self._experts(context, expert_inputs, experts_dim, model_dim)
    # COMBINE: [E`, G_u, C, M] -> (all-to-all) [E_u, G`, C, M]; x [G`, S, E_u, C] -> [G`, S, M]
    expert_outputs = mtf.reshape(
        expert_outputs, [experts_unsplit_dim, groups_dim, capacity_dim, model_dim])
    y = dispatch_lib.COMBINE[self.dispatch](expert_outputs, result, group_dim)  # [G`, S, M]
    y = mtf.reshape(y, x_shape)  # [G, S, M] -> [B..., L, M]

    metrics = self._add_losses_and_metrics(
        context, result, experts_unsplit_dim, group_dim, nonpadding)
    self._record(x.mesh.graph, result, batch_and_length_dims, metrics)
    return y

  def _experts(self, context, expert_inputs, experts_dim, model_dim):
    """GEGLU (or any activation product) experts, no biases: [E, G, C, M] -> [E, G, C, M].

    The same variables (`wi_0/kernel`, `wi_1/kernel`, `wo/kernel`, or `wi/kernel` with one
    activation), initialisers and arithmetic as `mtf.layers.dense_product` / `dense`; only the
    kernel gradients are ordered differently (`ExpertEinsum`).
    """
    hidden_dim = mtf.Dimension("expert_hidden", self.hidden_size)
    factors = []
    for i, activation in enumerate(self.activation):
      name = f"wi_{i}" if len(self.activation) > 1 else "wi"
      factor = expert_dense(expert_inputs, model_dim, hidden_dim, experts_dim,
                            context.variable_dtype, name)  # [E, G, C, H]
      if activation != "linear":
        factor = (getattr(mtf, activation) if isinstance(activation, str) else activation)(factor)
      factors.append(factor)
    h = functools.reduce(mtf.multiply, factors)
    if self.multiplicative_bias:
      bias = mtf.get_variable(
          expert_inputs.mesh, "multiplicative_bias", mtf.Shape([experts_dim, hidden_dim]),
          initializer=tf.ones_initializer(), dtype=context.variable_dtype)
      h *= mtf.cast(bias, h.dtype)
    if self.additive_bias:
      # An empty capacity slot computes B too; its combine weight is 0, so it reaches no output.
      bias = mtf.get_variable(
          expert_inputs.mesh, "additive_bias", mtf.Shape([experts_dim, hidden_dim]),
          initializer=tf.zeros_initializer(), dtype=context.variable_dtype)
      h += mtf.cast(bias, h.dtype)
    if context.train and self.expert_dropout_rate > 0.0:
      h = mtf.dropout(h, context.train, keep_prob=1.0 - self.expert_dropout_rate)
    return expert_dense(h, hidden_dim, model_dim, experts_dim, context.variable_dtype,
                        "wo")  # [E, G, C, M]

  def _add_losses_and_metrics(self, context, result, experts_dim, group_dim, nonpadding):
    """One context.losses entry per loss; summaries under `<scope>/router/`; returns metrics.

    The summaries are `mtf.scalar_summary`s: lowered into mtf's summary collection, which
    `st_moe.summaries` writes to the event files (CPU: every training step; TPU: mtf's host call;
    evaluation: their means over the evaluation batches).
    """
    balance = losses_lib.load_balance_loss(
        result.router_probs, result.top1_mask, experts_dim, group_dim, nonpadding)
    z_loss = losses_lib.router_z_loss(result.router_logits, experts_dim, nonpadding)
    metrics = routing.routing_metrics(result, experts_dim, nonpadding)
    prefix = "router/"  # mtf prefixes op names with the variable scope: <scope>/router/...
    mtf.scalar_summary(prefix + "balance_loss", balance)
    mtf.scalar_summary(prefix + "z_loss", z_loss)
    for key, value in metrics.items():
      mtf.scalar_summary(prefix + key, value)
    if context.losses is not None:
      # Computed in float32; entered in the activation dtype, as mesh's own loss terms are (the
      # model sums context.losses with mtf.add_n, which needs one dtype).
      dtype = context.activation_dtype
      if self.balance_loss_coef:
        context.losses.append(mtf.cast(
            losses_lib.scale(balance, self.balance_loss_coef, context.num_microbatches), dtype))
      if self.router_z_loss_coef:
        context.losses.append(mtf.cast(
            losses_lib.scale(z_loss, self.router_z_loss_coef, context.num_microbatches), dtype))
    return dict(balance_loss=balance, z_loss=z_loss, **metrics)

  def _record(self, graph, result, batch_and_length_dims, metrics):
    """Adds this call's RoutingRecord to the graph's registry."""
    selected_dim = result.expert_index.shape.dims[-1]
    shape = batch_and_length_dims + [selected_dim]  # [G, S, K] -> [B..., L, K]
    experts_dim = result.router_probs.shape.dims[-1]
    record = RoutingRecord(
        name=tf.get_variable_scope().name,
        expert_index=mtf.reshape(result.expert_index, shape),
        gates=mtf.reshape(result.gates, shape),
        kept=mtf.reshape(result.kept, shape),
        router_probs=mtf.reshape(result.router_probs, batch_and_length_dims + [experts_dim]),
        metrics=metrics)
    if not hasattr(graph, _RECORDS_ATTR):
      setattr(graph, _RECORDS_ATTR, [])
    getattr(graph, _RECORDS_ATTR).append(record)
