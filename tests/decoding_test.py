"""Decoding a trained tiny ST-MoE: every incremental step's logits equal the full-sequence pass.

A tiny st_moe_tiny.gin model (2 + 2 layers, 4 experts, top-2, a sparse layer in encoder and
decoder) is trained in-process for a few dozen Adafactor steps on a reverse-the-tokens task, with
the training settings (random second-expert policy, capacity factor 1.25). Its weights are then
loaded into an evaluation graph that

  * decodes greedily with mesh_tensorflow's own `Bitransformer.decode` (a while loop in which
    `SparseFFN` routes one position of every sequence per step);
  * decodes again with the same steps unrolled (the body of `Unitransformer.sample_autoregressive`
    written out position by position, so each step's logits can be fetched: they live inside the
    while loop in mtf's version), checked against the first to give the same tokens;
  * scores the decoded sequences teacher-forced, all positions at once (`call_simple`).

The reference of a decoding step is the full-sequence pass: at a capacity where nothing is
dropped (capacity_factor_eval = E here; decoding steps at the default capacity_factor_decode =
None), routing is per token, so step p's logits must equal position p's logits of the
full pass over the decoded prefix. A second test shows determinism: the same weights give
bit-identical logits in two sessions with the default evaluation policy, and different ones
with the random policy (so the check can fail).
"""
import types

from absl.testing import absltest
import entry_point
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import layers
from st_moe.analysis import model_graph
import graph_mode


def setUpModule():
  graph_mode.enter()


def tearDownModule():
  gin.clear_config()
  graph_mode.leave()


VOCAB = 24  # ids 0 (pad), 1 (EOS), 3..19 words; padded to 128 rows by the model
BATCH, LENGTH = 16, 8
TRAIN_STEPS = 40
VARIABLE_DTYPE = mtf.VariableDType(tf.float32, tf.float32, tf.float32)


def copy_task_batch(rng, batch=BATCH):
  """inputs: 3 to 6 random word ids then EOS; targets: the words reversed, then EOS."""
  inputs = np.zeros((batch, LENGTH), np.int32)
  targets = np.zeros((batch, LENGTH), np.int32)
  for b in range(batch):
    n = rng.randint(3, 7)
    words = rng.randint(3, 20, size=n)
    inputs[b, :n], inputs[b, n] = words, 1
    targets[b, :n], targets[b, n] = words[::-1], 1
  return inputs, targets


def parse(*gin_params):
  # 2 + 2 layers (tests/entry_point.py): one dense and one sparse layer in each stack.
  model_graph.parse_gin(["st_moe_tiny.gin", "cpu.gin"],
                        ["dropout_rate = 0.0", *entry_point.TWO_LAYERS, *gin_params])


def build_model():
  return mtf_utils.build_model(model_type="bitransformer", input_vocab_size=VOCAB,
                               output_vocab_size=VOCAB, layout_rules="", mesh_shape="")


def lower(graph, mesh):
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
  return mtf.Lowering(graph, {mesh: mesh_impl}, autostack=False)


def train(steps=TRAIN_STEPS):
  """Trains the gin-configured model in-process; returns ({variable name: value}, losses)."""
  rng = np.random.RandomState(0)
  with tf.Graph().as_default():
    tf.set_random_seed(0)
    global_step = tf.train.get_or_create_global_step()
    model = build_model()
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "my_mesh")
    batch_dim = mtf.Dimension("batch", BATCH)
    length_dim = mtf.Dimension("length", LENGTH)
    feeds = {k: tf.placeholder(tf.int32, [BATCH, LENGTH]) for k in ("inputs", "targets")}
    features = {k: mtf.import_tf_tensor(mesh, v, mtf.Shape([batch_dim, length_dim]))
                for k, v in feeds.items()}
    _, loss = model.call_simple(
        inputs=features["inputs"], targets=features["targets"], compute_loss=True,
        mode=tf.estimator.ModeKeys.TRAIN, variable_dtype=VARIABLE_DTYPE,
        encoder_sequence_id=mtf.minimum(features["inputs"], 1),
        decoder_sequence_id=mtf.minimum(features["targets"], 1))
    variables = graph.trainable_variables
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    updates = mtf.optimize.AdafactorOptimizer(learning_rate=0.01).apply_grads(grads, variables)
    lowering = lower(graph, mesh)
    tf_loss = lowering.export_to_tf_tensor(loss)
    train_op = tf.group([lowering.lowered_operation(op) for op in updates] +
                        [tf.assign_add(global_step, 1)])
    losses = []
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(lowering.copy_masters_to_slices())
      for _ in range(steps):
        inputs, targets = copy_task_batch(rng)
        value, _ = sess.run([tf_loss, train_op],
                            {feeds["inputs"]: inputs, feeds["targets"]: targets})
        losses.append(value)
      sess.run(lowering.copy_slices_to_masters())
      weights = sess.run({v.name: v.get_master() for v in graph.all_variables})
  return weights, losses


def unrolled_greedy_decode(model, inputs, length_dim):
  """Greedy decoding as `Bitransformer.decode` / `sample_autoregressive` (no partial sequences),
  with the while loop unrolled: returns (ids <int32>[B, L], [logits <float32>[B, V]] per step).
  """
  mesh = inputs.mesh
  decoder = model.decoder
  shared_params = model._shared_params(mesh, VARIABLE_DTYPE)  # pylint: disable=protected-access
  encoder_layer_outputs = []
  encoder_sequence_id = mtf.minimum(inputs, 1)
  encoder_output, _ = model.encoder.call_simple(
      inputs=inputs, targets=None, compute_loss=False, mode=tf.estimator.ModeKeys.PREDICT,
      variable_dtype=VARIABLE_DTYPE, sequence_id=encoder_sequence_id,
      shared_params=shared_params, layer_outputs=encoder_layer_outputs)
  encoder_output = mtf.layers.rename_length_to_memory_length(encoder_output)
  encoder_sequence_id = mtf.layers.rename_length_to_memory_length(encoder_sequence_id)
  encoder_inputs = mtf.layers.rename_length_to_memory_length(inputs)
  batch_dims = inputs.shape.dims[:-1]
  ids = mtf.zeros(mesh, mtf.Shape(batch_dims + [length_dim]), tf.int32)
  position = mtf.zeros(mesh, mtf.Shape(batch_dims), tf.int32)
  length_range = mtf.range(mesh, length_dim, tf.int32)
  common = dict(model=decoder, mesh=mesh, batch_dims=batch_dims, length_dim=length_dim,
                variable_dtype=VARIABLE_DTYPE, sequence_id=1, encoder_output=encoder_output,
                encoder_sequence_id=encoder_sequence_id, shared_params=shared_params,
                encoder_layer_outputs=encoder_layer_outputs, write_priority=length_range,
                encoder_inputs=encoder_inputs)
  first_part = transformer.Context(
      mode="first_part", position=length_range, position_is_default=True, new_states=[],
      initial_position=position, constant_states=[], read_priority=length_range, inputs=ids,
      **common)
  with tf.variable_scope(decoder.name):
    decoder._call_internal(first_part, transformer.autoregressive_inputs(ids))  # pylint: disable=protected-access
  states = [mtf.zeros_like(t) for t in first_part.new_states]  # has_partial_sequences=False
  step_logits = []
  for _ in range(length_dim.size):
    inputs_this_step = mtf.gather(ids, position - 1, length_dim)
    context = transformer.Context(
        mode="incremental", position=position, states=states, new_states=[],
        constant_states=first_part.constant_states, read_priority=position,
        inputs=inputs_this_step, **common)
    with tf.variable_scope(decoder.name, reuse=True):
      logits = decoder._call_internal(context, inputs_this_step)  # pylint: disable=protected-access
    step_logits.append(logits)
    ids_this_step = mtf.sample_with_temperature(logits, decoder.output_vocab_dim, 0.0)
    ids += ids_this_step * mtf.one_hot(position, length_dim, dtype=tf.int32)
    position += 1
    states = context.new_states
  return ids, step_logits


def teacher_forced_logits(model, inputs, targets):
  """<float32>[B, L, V]: the full-sequence evaluation pass over `targets`."""
  logits, _ = model.call_simple(
      inputs=inputs, targets=targets, compute_loss=False, mode=tf.estimator.ModeKeys.EVAL,
      variable_dtype=VARIABLE_DTYPE, encoder_sequence_id=mtf.minimum(inputs, 1))
  return logits


def run_with_weights(graph, mesh, weights, fetch, sessions=1):
  """Lowers `graph`, loads `weights` into its variables, returns numpy values of `fetch`
  (a list of them, one per fresh session, if sessions > 1)."""
  lowering = lower(graph, mesh)
  tf_fetch = {k: lowering.export_to_tf_tensor(v) for k, v in fetch.items()}
  assigns = [v.assign_to_master(tf.constant(weights[v.name])) for v in graph.all_variables]
  outs = []
  for _ in range(sessions):
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(assigns)
      sess.run(lowering.copy_masters_to_slices())
      outs.append(sess.run(tf_fetch))
  return outs if sessions > 1 else outs[0]


class DecodingTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    parse()
    cls.weights, cls.losses = train()
    cls.inputs, cls.targets = copy_task_batch(np.random.RandomState(1))

  def test_trained(self):
    # Not a quality bar: the model must have moved from its initial loss (about ln 128).
    self.assertLess(np.mean(self.losses[-5:]), np.mean(self.losses[:5]) - 0.5, self.losses)

  def test_each_decoding_step_equals_the_full_sequence_pass(self):
    parse("capacity_factor_eval = 4.0")  # E = 4: C = S in full-sequence passes, nothing dropped
    with tf.Graph().as_default():
      model = build_model()
      graph = mtf.Graph()
      mesh = mtf.Mesh(graph, "my_mesh")
      batch_dim = mtf.Dimension("batch", BATCH)
      length_dim = mtf.Dimension("length", LENGTH)
      inputs = mtf.import_tf_tensor(mesh, tf.constant(self.inputs),
                                    mtf.Shape([batch_dim, length_dim]))
      mtf_decoded = model.decode(inputs, variable_dtype=VARIABLE_DTYPE,
                                 max_decode_length=LENGTH)
      records_before = len(layers.routing_records(graph))
      ids, step_logits = unrolled_greedy_decode(model, inputs, length_dim)
      full_logits = teacher_forced_logits(model, inputs, ids)
      step_records = layers.routing_records(graph)[records_before:]
      fetch = {"mtf_decoded": mtf_decoded, "ids": ids, "full": full_logits}
      fetch.update({f"step/{p}": l for p, l in enumerate(step_logits)})
      fetch.update({f"dropped/{n}": r.metrics["fraction_dropped"]
                    for n, r in enumerate(step_records)})
      out = run_with_weights(graph, mesh, self.weights, fetch)
    # The unrolled loop decodes what mtf's while loop decodes (up to each sequence's EOS, after
    # which mtf stops writing).
    for b in range(BATCH):
      row = out["mtf_decoded"][b]
      end = int(np.argmax(row == 1)) + 1 if (row == 1).any() else LENGTH
      np.testing.assert_array_equal(out["ids"][b, :end], row[:end], err_msg=f"sequence {b}")
    # Nothing dropped anywhere: the incremental steps (default capacity_factor_decode), the
    # encoder and the teacher-forced pass (capacity_factor_eval = E).
    dropped = {k: v for k, v in out.items() if k.startswith("dropped/")}
    # Sparse layers: 1 in the encoder, 1 in the decoder; the unrolled decode calls the encoder
    # once, the decoder once for the first part and once per step; then the teacher-forced pass.
    self.assertLen(dropped, 1 + 1 * (1 + LENGTH) + 2)
    self.assertEqual(max(dropped.values()), 0.0)
    for p in range(LENGTH):
      np.testing.assert_allclose(out[f"step/{p}"], out["full"][:, p], rtol=0, atol=2e-4,
                                 err_msg=f"position {p}")
    # Not a trivial agreement: the model is not constant over positions, and the decoded tokens
    # reverse at least some words.
    self.assertGreater(np.abs(out["full"][:, 0] - out["full"][:, 1]).max(), 1e-2)
    words = self.inputs[:, :3]
    self.assertGreater((out["ids"][:, 0] == self.targets[:, 0]).mean(), 0.0,
                       (out["ids"], words))

  def test_evaluation_is_deterministic_and_the_random_policy_draws_the_same_each_time(self):
    results = {}
    # The random policy keeps a second choice with probability min(1, g2 / t); the renormalised
    # g2 is at most 0.5, so t = 1 makes every keep a coin flip (at t = 0.2 this barely trained
    # router, g2 near 0.5, would keep them all).
    for policy in (None, "random"):
      parse(*([] if policy is None else [f"st_moe.SparseFFN.second_policy_eval = '{policy}'",
                                         "st_moe.SparseFFN.second_threshold_eval = 1.0"]))
      results[policy] = []
      for _ in range(2):  # two graphs, each lowered anew, as two evaluation runs would be
        with tf.Graph().as_default():
          model = build_model()
          graph = mtf.Graph()
          mesh = mtf.Mesh(graph, "my_mesh")
          shape = mtf.Shape([mtf.Dimension("batch", BATCH), mtf.Dimension("length", LENGTH)])
          inputs = mtf.import_tf_tensor(mesh, tf.constant(self.inputs), shape)
          targets = mtf.import_tf_tensor(mesh, tf.constant(self.targets), shape)
          fetch = {"logits": teacher_forced_logits(model, inputs, targets)}
          if policy is None:
            fetch["decoded"] = model.decode(inputs, variable_dtype=VARIABLE_DTYPE,
                                            max_decode_length=LENGTH)
          results[policy].append(run_with_weights(graph, mesh, self.weights, fetch))
    (first, second) = results[None]
    np.testing.assert_array_equal(first["logits"], second["logits"])
    np.testing.assert_array_equal(first["decoded"], second["decoded"])
    # The random policy: its draws change the logits, and two graphs draw the same numbers (mtf's
    # random ops seeded by op index and slice on the CPU, st_moe.determinism; upstream's seeding
    # gave other draws in each graph).
    (first, second) = results["random"]
    self.assertGreater(np.abs(first["logits"] - results[None][0]["logits"]).max(), 1e-6)
    np.testing.assert_array_equal(first["logits"], second["logits"])


if __name__ == "__main__":
  absltest.main()
