"""SparseFFN against upstream mesh_tensorflow.transformer.moe.MoE1D (top_2, GEGLU), same weights.

With second-expert policy "all" or "none", equal capacity factor and group size, our layer and
upstream's give the same outputs, balance loss and z-loss, and in training the same gradients
of the input and of every weight (router and experts) (upstream's z-loss weight is
z_loss * loss_coef, so MoE1D.z_loss = router_z_loss_coef / balance_loss_coef) to 1e-5 in float32.
Upstream's z-loss needs a padding mask, so the context has sequence ids (with padding).
"""

from absl.testing import absltest
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import moe as upstream_moe
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import layers
import graph_mode
import layer_harness


setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

BATCH, LENGTH, D_MODEL, HIDDEN, EXPERTS = 4, 16, 8, 12, 4
BALANCE_COEF, Z_COEF = 1e-2, 1e-3
# ours -> upstream variable names (the scope prefix differs).
NAME_MAP = {"router/kernel": "top_2_gating/kernel", "wi_0/kernel": "wi_0/kernel",
            "wi_1/kernel": "wi_1/kernel", "wo/kernel": "wo/kernel"}


def run_pair(capacity_factor, policy, mode="train", group_size=16, dispatch="einsum"):
  """Builds ours and upstream on the same input and weights; returns numpy results of both."""
  graph, mesh = layer_harness.new_graph(seed=1)
  x, batch_dim, length_dim, model_dim, variable_dtype = layer_harness.random_input(
      mesh, BATCH, LENGTH, D_MODEL)
  sequence_id = layer_harness.sequence_ids(mesh, batch_dim, length_dim, {1: 11, 3: 5})

  def context():
    return layer_harness.fake_context(mesh, batch_dim, length_dim, model_dim, variable_dtype,
                                      mode=mode, sequence_id=sequence_id)

  ours = layers.SparseFFN(
      num_experts=EXPERTS, hidden_size=HIDDEN, group_size=group_size,
      capacity_factor_train=capacity_factor, capacity_factor_eval=capacity_factor,
      second_policy_train=policy, second_policy_eval=policy, activation=("gelu", "linear"),
      num_selected_experts=2, balance_loss_coef=BALANCE_COEF, router_z_loss_coef=Z_COEF,
      dispatch=dispatch)

  def upstream(z_loss):
    return upstream_moe.MoE1D(
        num_experts=EXPERTS, hidden_size=HIDDEN, group_size=group_size,
        capacity_factor_train=capacity_factor, capacity_factor_eval=capacity_factor,
        second_policy_train=policy, second_policy_eval=policy, activation=["gelu", "linear"],
        moe_gating="top_2", loss_coef=BALANCE_COEF, z_loss=z_loss)

  results, losses = {}, {}
  for name, layer in (("ours", ours), ("upstream", upstream(Z_COEF / BALANCE_COEF)),
                      ("upstream_balance_only", upstream(None))):
    ctx = context()
    with tf.variable_scope(name):
      y = layer.call(ctx, x)
    aux = mtf.add_n(ctx.losses) if ctx.losses else mtf.zeros(mesh, mtf.Shape([]))
    loss = mtf.reduce_sum(mtf.square(y)) + aux
    grad_x, = mtf.gradients([loss], [x])
    results[name] = [y, grad_x] + list(ctx.losses)
    losses[name] = loss
  variables = {v.name: v for v in graph.trainable_variables}
  # The weights' gradients of ours and of upstream with its z-loss, in NAME_MAP's order.
  grads = {name: mtf.gradients([losses[name]],
                               [variables[f"{name}/{n}"].outputs[0] for n in names])
           for name, names in (("ours", list(NAME_MAP)), ("upstream", list(NAME_MAP.values())))}
  lowering = layer_harness.lower(graph, mesh)
  fetches = {k: [lowering.export_to_tf_tensor(t) for t in v] for k, v in results.items()}
  fetches.update({k + "_grads": [lowering.export_to_tf_tensor(t) for t in v]
                  for k, v in grads.items()})
  copies = []
  for ours_name, up_name in NAME_MAP.items():
    source = variables["upstream/" + up_name].get_master()
    for target in ("ours/" + ours_name, "upstream_balance_only/" + up_name):
      copies.append(variables[target].assign_to_master(source))
  with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(copies)
    sess.run(lowering.copy_masters_to_slices())
    return sess.run(fetches)


class UpstreamParityTest(absltest.TestCase):

  def _check(self, capacity_factor, policy, mode="train", dispatch="einsum"):
    out = run_pair(capacity_factor, policy, mode, dispatch=dispatch)
    ours, up, up_balance = out["ours"], out["upstream"], out["upstream_balance_only"]
    msg = f"cf={capacity_factor} policy={policy} mode={mode}"
    self.assertGreater(np.abs(ours[0]).max(), 1e-3, msg)  # a real output, not zeros
    np.testing.assert_allclose(ours[0], up[0], atol=1e-5, rtol=1e-5, err_msg="output " + msg)
    balance, z = ours[2], ours[3]
    np.testing.assert_allclose(balance, up_balance[2], rtol=1e-5, err_msg="balance " + msg)
    if mode == "train":  # upstream adds its z-loss in training only (ours always reports it)
      np.testing.assert_allclose(ours[1], up[1], atol=1e-5, rtol=1e-5, err_msg="d/dx " + msg)
      np.testing.assert_allclose(balance + z, up[2], rtol=1e-5, err_msg="total " + msg)
      self.assertGreater(z, 0.0)
      # The weights' gradients (ExpertEinsum writes the expert kernels' own): router and
      # experts against upstream's, variable by variable.
      for i, var in enumerate(NAME_MAP):
        theirs = out["upstream_grads"][i]
        self.assertGreater(np.abs(theirs).max(), 1e-6, f"{var} {msg}")  # a real gradient
        np.testing.assert_allclose(out["ours_grads"][i], theirs, atol=1e-5, rtol=1e-4,
                                   err_msg=f"d/d {var} {msg}")
    return out

  def test_policy_all(self):
    for cf in (1.0, 2.0):
      self._check(cf, "all")

  def test_gather_dispatch(self):
    self._check(1.0, "all", dispatch="gather")

  def test_policy_none(self):
    self._check(1.25, "none")

  def test_eval_mode(self):
    self._check(2.0, "all", mode="eval")

  def test_overflow_is_exercised(self):
    # cf 1.0 with top-2 has slots for half of the choices: some tokens lose a choice, so the
    # parity above covers dropping as well as routing.
    out = run_pair(1.0, "all")
    self.assertGreater(np.abs(out["ours"][0] - run_pair(2.0, "all")["ours"][0]).max(), 1e-4)


if __name__ == "__main__":
  absltest.main()
