"""st_moe.GuardedOptimizer: a step with a non-finite gradient or update changes nothing and is counted.

A tiny mtf graph, lowered as mesh_tensorflow.transformer.utils lowers a training step (autostack on,
train op = the optimizer's lowered ops + the global step's increment), with two variables:
`kernel` [128, 128] (factored Adafactor slots vr, vc) and `scale` [4] (an unfactored slot v).
loss = sum(kernel * Y) + sum(sqrt(scale + offset)); feeding offset = -scale at one element makes
that element sqrt(0): the loss stays finite and the gradient of `scale` is inf there.

Expected values come from elsewhere: "unchanged" is the bytes read before the step; "a finite step
afterwards updates normally" is upstream mesh_tensorflow's AdafactorOptimizer alone, run on the same
initial values; the loss in the error is recomputed with numpy. One end-to-end run through
t5_mesh_transformer (learning rate inf: every update is non-finite) checks that the run stops
with the message and a non-zero exit.
"""
import os
import re
import shutil
import subprocess
import tempfile

from absl.testing import absltest

import entry_point
from absl.testing import parameterized
import mesh_tensorflow as mtf
from mesh_tensorflow import optimize
import numpy as np
import tensorflow.compat.v1 as tf

import graph_mode
from st_moe import guard

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave

KERNEL = np.linspace(-1.0, 1.0, 128 * 128, dtype=np.float32).reshape(128, 128)
Y = np.cos(np.arange(128 * 128)).astype(np.float32).reshape(128, 128)
SCALE = np.array([1.0, 4.0, 9.0, 16.0], np.float32)
FINITE = np.zeros(4, np.float32)
INF_GRAD = np.array([0.0, 0.0, 0.0, -16.0], np.float32)  # sqrt(16 - 16): d/dscale[3] = inf


def _adafactor(learning_rate):
  # A constant decay rate: the skipped step advances the global step, and the default decay
  # rate depends on it, which would make the guarded and the reference runs differ for that reason.
  return optimize.AdafactorOptimizer(learning_rate=learning_rate, decay_rate=0.8)


class _Step:
  """One training step of the tiny graph, lowered on a PlacementMeshImpl."""

  def __init__(self, guarded=True, learning_rate=0.1, max_consecutive_skips=3, mesh_shape="x:1",
               layout=""):
    self.graph = tf.Graph()
    with self.graph.as_default():
      global_step = tf.train.get_or_create_global_step()
      graph = mtf.Graph()
      mesh = mtf.Mesh(graph, "mesh")
      a, b, d = mtf.Dimension("a", 128), mtf.Dimension("b", 128), mtf.Dimension("d", 4)
      kernel = mtf.get_variable(mesh, "kernel", [a, b], initializer=tf.constant_initializer(KERNEL))
      scale = mtf.get_variable(mesh, "scale", [d], initializer=tf.constant_initializer(SCALE))
      self.offset = tf.placeholder(tf.float32, [4])
      y = mtf.import_tf_tensor(mesh, tf.constant(Y), [a, b])
      offset = mtf.import_tf_tensor(mesh, self.offset, [d])
      loss = mtf.reduce_sum(kernel * y) + mtf.reduce_sum(mtf.sqrt(scale + offset))
      variables = graph.trainable_variables
      grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
      if guarded:
        opt = guard.GuardedOptimizer(learning_rate=learning_rate, optimizer=_adafactor,
                                     max_consecutive_skips=max_consecutive_skips)
        self.found_loss = guard.find_loss(graph)
        self.loss = loss
      else:
        opt = _adafactor(learning_rate)
      ops = opt.apply_grads(grads, variables)
      mesh_shape = mtf.convert_to_shape(mesh_shape)
      impl = mtf.placement_mesh_impl.PlacementMeshImpl(
          mesh_shape, mtf.convert_to_layout_rules(layout), [""] * mesh_shape.size)
      lowering = mtf.Lowering(graph, {mesh: impl}, autostack=True)
      self.train_op = tf.group([lowering.lowered_operation(op) for op in ops]
                               + [tf.assign_add(global_step, 1)])
      restore = lowering.copy_masters_to_slices()
      self.to_masters = lowering.copy_slices_to_masters()
      self.state = {v.op.name: v for v in tf.global_variables() if v.op.name != "global_step"}
      self.counters = {v.op.name.split("/")[-1]: v for v in tf.local_variables()}
      self.session = tf.Session(graph=self.graph)
      self.session.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
      self.session.run(restore)

  def run(self, offset):
    self.session.run(self.train_op, {self.offset: offset})

  def values(self):
    """{name: numpy value} of the weights and Adafactor slots (masters, after the slices)."""
    self.session.run(self.to_masters)
    return self.session.run(self.state)

  def count(self):
    return self.session.run(self.counters)


def _assert_bits_equal(test, expected, actual):
  test.assertEqual(sorted(expected), sorted(actual))
  for name in expected:
    test.assertEqual(np.asarray(expected[name]).tobytes(), np.asarray(actual[name]).tobytes(), name)


class GuardedOptimizerTest(parameterized.TestCase):

  def test_state_names(self):
    # The state the skip must protect: both weights and all three Adafactor slots.
    step = _Step()
    self.assertEqual(sorted(step.state),
                     ["kernel", "kernel_slot_vc", "kernel_slot_vr", "scale", "scale_slot_v"])
    self.assertEqual(sorted(step.counters), ["consecutive_skipped", "skipped_steps"])

  @parameterized.named_parameters(("one_device", "x:1", ""), ("scale_split_over_2", "x:2", "d:x"))
  def test_skipped_step_changes_no_weight_and_no_slot(self, mesh_shape, layout):
    # On 2 devices the inf is in the second slice of `scale` only; every device must skip.
    step = _Step(mesh_shape=mesh_shape, layout=layout)
    before = step.values()
    step.run(INF_GRAD)
    _assert_bits_equal(self, before, step.values())
    self.assertEqual(step.count(), {"skipped_steps": 1, "consecutive_skipped": 1})

  def test_finite_step_after_a_skip_is_upstream_adafactor(self):
    guarded = _Step()
    guarded.run(INF_GRAD)
    guarded.run(FINITE)
    reference = _Step(guarded=False)
    reference.run(FINITE)
    expected = reference.values()
    self.assertFalse(np.array_equal(expected["scale"], SCALE))  # the step did move the weights
    _assert_bits_equal(self, expected, guarded.values())
    self.assertEqual(guarded.count(), {"skipped_steps": 1, "consecutive_skipped": 0})

  def test_finds_the_loss(self):
    step = _Step()
    self.assertIs(step.found_loss, step.loss)

  def test_consecutive_skips_stop_the_run_naming_step_loss_and_variable(self):
    step = _Step(max_consecutive_skips=3)
    step.run(INF_GRAD)
    step.run(INF_GRAD)
    self.assertEqual(step.count(), {"skipped_steps": 2, "consecutive_skipped": 2})
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                re.escape(guard.STOP_MESSAGE_PREFIX) + ": 3 consecutive") as cm:
      step.run(INF_GRAD)
    message = cm.exception.message
    self.assertIn("max_consecutive_skips = 3", message)
    self.assertIn("first variable with a non-finite gradient: scale;", message)
    self.assertIn("first variable with a non-finite update: scale_slot_v.", message)
    loss = float(re.search(r"loss ([-0-9.e+]+);", message).group(1))
    expected = (np.sum(KERNEL.astype(np.float64) * Y)
                + np.sum(np.sqrt(SCALE.astype(np.float64) + INF_GRAD)))
    self.assertAlmostEqual(loss, expected, delta=1e-4 * abs(expected))
    self.assertIn(int(re.search(r"global step (\d+)", message).group(1)), (2, 3))

  def test_a_finite_step_resets_the_consecutive_count(self):
    step = _Step(max_consecutive_skips=2)
    for offset in (INF_GRAD, FINITE, INF_GRAD, FINITE, INF_GRAD):
      step.run(offset)
    self.assertEqual(step.count(), {"skipped_steps": 3, "consecutive_skipped": 1})

  def test_non_finite_update_with_finite_gradients(self):
    step = _Step(learning_rate=float("inf"), max_consecutive_skips=1)
    before = step.values()
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "non-finite gradient: none \\(all finite\\); first variable with "
                                "a non-finite update: kernel\\."):
      step.run(FINITE)
    _assert_bits_equal(self, before, step.values())

  def test_zero_never_stops(self):
    step = _Step(max_consecutive_skips=0)
    for _ in range(4):
      step.run(INF_GRAD)
    self.assertEqual(step.count(), {"skipped_steps": 4, "consecutive_skipped": 4})

  def test_bad_max_consecutive_skips(self):
    with self.assertRaisesRegex(ValueError,
                                r"st_moe.GuardedOptimizer.max_consecutive_skips = -1: must be an "
                                r"integer >= 0"):
      guard.GuardedOptimizer(learning_rate=0.1, max_consecutive_skips=-1)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = entry_point.ENTRY_POINT


entry_point_command = entry_point.tiny_command
entry_point_env = entry_point.env


class GuardEntryPointTest(absltest.TestCase):

  def test_run_with_infinite_learning_rate_stops_with_the_message(self):
    tmp = tempfile.mkdtemp(prefix="st_moe_guard_")
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    out = subprocess.run(
        entry_point_command(os.path.join(tmp, "model"), "utils.run.train_steps = 6",
                            "learning_rate_schedules.learning_rate_schedule_noam.multiplier = 1e999",
                            "st_moe.GuardedOptimizer.max_consecutive_skips = 2"),
        capture_output=True, text=True, env=entry_point_env(), cwd=tmp, timeout=1500, check=False)
    self.assertNotEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertRegex(out.stderr, re.escape(guard.STOP_MESSAGE_PREFIX)
                     + r": 2 consecutive training steps .* loss [0-9.e+]+; first variable with a "
                     r"non-finite gradient: none \(all finite\); first variable with a non-finite "
                     r"update: \S+\.")


if __name__ == "__main__":
  absltest.main()
