"""st_moe.determinism: mtf random ops draw the same numbers in every process, and a training
step's reads of the global step run before its increment.

The step graph is mesh_tensorflow's training step in miniature: Adafactor's decay rate
1 - (step + 1)^-0.8 read from the step, an update that uses it, and `tf.assign_add(step, 1)` in
one `tf.group`, with nothing ordering the read and the increment. Two whole trainings of one seed
ending bit-identical: ResumedRunTest in tests/reproduce_test.py.
"""
import collections
import json
import os
import subprocess
import sys
import zlib

from absl.testing import absltest
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import tensorflow.compat.v1 as tf

import graph_mode
from st_moe import determinism
import st_moe.register  # pylint: disable=unused-import  (installs the wrapper, as runs do)



def setUpModule():
  graph_mode.enter()  # tf.disable_v2_behavior() turns resource variables off, as t5 does;
  st_moe.register.use_resource_variables()  # and st_moe.register turns them on again


tearDownModule = graph_mode.leave
STEPS = 200
# Draws of two mtf random ops on a 2-slice placement mesh ("a" split over the slices, "b" not),
# lowered in one graph per seed.
DRAW = """
import json, sys
import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf
tf.disable_v2_behavior()
import st_moe.register

def draw(seed):
  with tf.Graph().as_default():
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "m")
    x = mtf.random_uniform(mesh, mtf.Shape([mtf.Dimension("a", 4), mtf.Dimension("b", 3)]))
    y = mtf.random_uniform(mesh, mtf.Shape([mtf.Dimension("b", 3)]))
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(
        mtf.Shape([mtf.Dimension("p", 2)]), mtf.convert_to_layout_rules("a:p"), ["", ""])
    tf.set_random_seed(seed)
    lowering = mtf.Lowering(graph, {mesh: impl})
    with tf.Session() as s:
      a, b = s.run([lowering.export_to_tf_tensor(x), lowering.export_to_tf_tensor(y)])
  return [a.tolist(), b.tolist()]

print(json.dumps([draw(int(seed)) for seed in sys.argv[1:]]))
"""


def draws(*seeds):
  """One fresh process (its own PYTHONHASHSEED and Python `random` state): a draw per seed."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, "-c", DRAW] + [str(s) for s in seeds],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


class SeededRandomOpsTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_two_processes_draw_the_same_numbers_and_another_seed_others(self):
    first, second = draws(1, 1, 2), draws(1)
    self.assertEqual(first[0], first[1])  # one process, two graphs of seed 1
    self.assertEqual(first[0], second[0])  # two processes
    self.assertNotEqual(first[0], first[2])  # seed 2
    self.assertNotEqual(first[0][0], first[0][0][::-1])  # not a constant

  def test_upstream_seeding_differs_between_graphs_of_one_seed(self):
    # What is fixed: upstream seeds each op from Python's unseeded `random` (and the string hash).
    gin.bind_parameter("st_moe.determinism.seeded_random_ops", False)
    self.assertNotEqual(self.lower_once(seed=1), self.lower_once(seed=1))
    gin.clear_config()
    self.assertEqual(self.lower_once(seed=1), self.lower_once(seed=1))

  def lower_once(self, seed):
    with tf.Graph().as_default():
      graph = mtf.Graph()
      mesh = mtf.Mesh(graph, "m")
      x = mtf.random_uniform(mesh, mtf.Shape([mtf.Dimension("b", 6)]))
      impl = mtf.placement_mesh_impl.PlacementMeshImpl(
          mtf.Shape([]), mtf.convert_to_layout_rules(""), [""])
      tf.set_random_seed(seed)
      lowering = mtf.Lowering(graph, {mesh: impl})
      with tf.Session() as s:
        return s.run(lowering.export_to_tf_tensor(x)).tolist()

  def test_op_seed_is_a_crc32_of_index_and_slice(self):
    # Independent of the code: zlib's CRC-32 of the documented string, 31 bits.
    self.assertEqual(determinism.op_seed(3, [2, 0]),
                     zlib.crc32(b"st_moe.random_op:3:[2, 0]") & 0x7FFFFFFF)
    self.assertNotEqual(determinism.op_seed(3, [0, 0]), determinism.op_seed(3, [2, 0]))
    self.assertNotEqual(determinism.op_seed(3, [0, 0]), determinism.op_seed(4, [0, 0]))

  def test_slices_of_an_unsplit_tensor_agree(self):
    # y has no split dimension: both slices must hold the same draw, as upstream guarantees.
    with tf.Graph().as_default():
      graph = mtf.Graph()
      mesh = mtf.Mesh(graph, "m")
      y = mtf.random_uniform(mesh, mtf.Shape([mtf.Dimension("b", 5)]))
      impl = mtf.placement_mesh_impl.PlacementMeshImpl(
          mtf.Shape([mtf.Dimension("p", 2)]), mtf.convert_to_layout_rules("a:p"), ["", ""])
      lowering = mtf.Lowering(graph, {mesh: impl})
      slices = lowering.tensors[y].tensor_list
      with tf.Session() as s:
        first, second = s.run(slices)
    np.testing.assert_array_equal(first, second)


def mini_step():
  """(train_op, decay, the reads of the step feeding the step's work, the increment op)."""
  step = tf.train.get_or_create_global_step()
  w = tf.get_variable("w", [64], initializer=tf.ones_initializer())
  decay = 1.0 - tf.pow(tf.cast(step, tf.float32) + 1.0, -0.8)  # adafactor_decay_rate_pow
  update = tf.assign_sub(w, (1.0 - decay) * w)
  increment = tf.assign_add(step, 1)  # read_value: a read after the increment
  train_op = tf.group(update, increment)
  graph = tf.get_default_graph()
  reads = [op for op in graph.get_operations()
           if op.type == "ReadVariableOp" and op.inputs[0].op is step.handle.op]
  add = [op for op in graph.get_operations() if op.type == "AssignAddVariableOp"]
  return train_op, decay, reads, add[0]


class OrderStepReadsTest(absltest.TestCase):

  def test_increment_waits_for_the_reads_before_it(self):
    with tf.Graph().as_default():
      train_op, decay, reads, increment = mini_step()
      # Three reads: the variable's own snapshot (made with it), tf.cast's (feeds the decay
      # rate) and assign_add's read_value (after the increment).
      self.assertLen(reads, 3)
      before = [r for r in reads if increment not in r.control_inputs]
      after = [r for r in reads if increment in r.control_inputs]
      self.assertLen(before, 2)
      self.assertLen(after, 1)
      self.assertEmpty(increment.control_inputs)
      self.assertEqual(determinism.order_step_reads(), 2)
      self.assertCountEqual(increment.control_inputs, before)  # not `after`: a cycle
      with tf.train.MonitoredSession() as session:
        seen = [session.run([train_op, decay])[1] for _ in range(STEPS)]
    # Step n (from 0) reads n: the hand formula, every step.
    np.testing.assert_allclose(seen, 1.0 - (np.arange(STEPS) + 1.0) ** -0.8, rtol=1e-6)

  def test_graph_without_global_step(self):
    with tf.Graph().as_default():
      tf.get_variable("w", [2])
      self.assertEqual(determinism.order_step_reads(), 0)


Spec = collections.namedtuple("Spec", ["train_op"])


class WrapperTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def build(self, use_tpu, mode=tf.estimator.ModeKeys.TRAIN):
    """Calls a wrapped fake tpu_estimator_model_fn; returns whether the graph came out ordered."""
    def fake_tpu_estimator_model_fn(**kwargs):  # pylint: disable=unused-argument
      def model_fn(features, labels, mode, params=None, config=None):  # pylint: disable=unused-argument
        self.increment = mini_step()[3]
        return Spec(tf.no_op())
      return model_fn
    wrapped = determinism.model_fn_builder(fake_tpu_estimator_model_fn)
    with tf.Graph().as_default():
      wrapped(use_tpu=use_tpu, model_dir="unused")({}, None, mode)
      return bool(self.increment.control_inputs)

  def test_cpu_training_is_ordered(self):
    self.assertTrue(self.build(use_tpu=None))

  def test_tpu_and_evaluation_and_disabled_are_left_alone(self):
    self.assertFalse(self.build(use_tpu="some-tpu"))
    self.assertFalse(self.build(use_tpu=None, mode=tf.estimator.ModeKeys.EVAL))
    gin.bind_parameter("st_moe.determinism.ordered_step_reads", False)
    self.assertFalse(self.build(use_tpu=None))

  def test_register_installs_both(self):
    self.assertTrue(hasattr(mtf_utils.tpu_estimator_model_fn, determinism._ORIGINAL_ATTR))  # pylint: disable=protected-access
    self.assertIs(mtf.placement_mesh_impl.PlacementMeshImpl.random, determinism.seeded_random)
    self.assertFalse(determinism.install())  # once per process


if __name__ == "__main__":
  absltest.main()
