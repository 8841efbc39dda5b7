"""st_moe.summaries: the per-step writes on the CPU, the evaluation means, the TPU pass-through.

The end-to-end check (a real t5_mesh_transformer run whose event files hold the router scalars of
every sparse layer) is tests/runner_test.py RealRunTest.
"""
import tempfile
from unittest import mock

from absl.testing import absltest
import gin
import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

from st_moe import summaries
from st_moe.experiments import events
import graph_mode

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave


class LoopScalarsTest(absltest.TestCase):
  """Scalars lowered inside mtf's microbatch loop (a tf.while_loop) cannot be read outside it:
  they are left out, and the rest still written."""

  def _graph_with_a_loop_scalar(self):
    key = mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY
    outside = tf.constant(1.0)
    tf.add_to_collection(key, ("outside/router/z_loss", outside))

    def body(i, x):
      tf.add_to_collection(key, ("inside/router/z_loss", x * 2.0))
      return i + 1, x * 2.0

    tf.while_loop(lambda i, x: i < 2, body, [tf.constant(0), tf.constant(1.0)])
    return key

  def test_collected_scalars_leave_out_those_inside_a_loop(self):
    with tf.Graph().as_default():
      self._graph_with_a_loop_scalar()
      self.assertEqual([name for name, _ in summaries.collected_scalars()],
                       ["outside/router/z_loss"])

  def test_drop_loop_scalars_empties_them_from_the_collection(self):
    with tf.Graph().as_default():
      key = self._graph_with_a_loop_scalar()
      self.assertLen(tf.get_collection(key), 2)
      self.assertEqual(summaries.drop_loop_scalars(), ["inside/router/z_loss"])
      self.assertEqual([name for name, _ in tf.get_collection(key)], ["outside/router/z_loss"])


class TrainWritesTest(absltest.TestCase):

  def test_each_step_writes_loss_and_collected_scalars_at_the_step_after_its_update(self):
    with tempfile.TemporaryDirectory() as d, tf.Graph().as_default():
      step_var = tf.train.get_or_create_global_step()
      counter = tf.Variable(0.0, use_resource=True)
      loss = 10.0 - counter.read_value()  # 10, 9, 8 at steps 1, 2, 3 (read before the update)
      tf.add_to_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY,
                           ("encoder/block_001/sparse_ffn/SparseFFN/router/z_loss",
                            2.0 * loss))
      with tf.control_dependencies([loss]):
        train_op = tf.group(counter.assign_add(1.0), step_var.assign_add(1))
      spec = tf.estimator.EstimatorSpec(tf.estimator.ModeKeys.TRAIN, loss=loss, train_op=train_op)
      spec = summaries.add_train_writes(spec, d)
      (hook,) = spec.training_chief_hooks
      with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        hook.after_create_session(sess, None)
        for _ in range(3):
          sess.run(spec.train_op)
        # No end() and no close: a killed run's finished steps are already in the file.
        reader = events.EventReader(d)
        reader.poll()
      self.assertEqual(reader.curve("loss"), ([1, 2, 3], [10.0, 9.0, 8.0]))
      self.assertEqual(reader.curve("encoder/block_001/sparse_ffn/SparseFFN/router/z_loss"),
                       ([1, 2, 3], [20.0, 18.0, 16.0]))


class EvalMetricsTest(absltest.TestCase):

  def test_router_means_join_the_evaluation_metrics(self):
    with tf.Graph().as_default():
      batch = tf.placeholder(tf.float32, [])
      tf.add_to_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY,
                           ("dec/router/fraction_dropped", batch))
      xent = tf.placeholder(tf.float32, [2])

      def metric_fn(x):
        return {"neg_log_perplexity": tf.metrics.mean(-x)}

      spec = tpu_estimator.TPUEstimatorSpec(tf.estimator.ModeKeys.EVAL, loss=tf.constant(1.0),
                                            eval_metrics=(metric_fn, [xent]))
      spec = summaries.add_eval_metrics(spec)
      # What TPUEstimator's CPU path evaluates: the spec's recorded host calls.
      self.assertIn("dec/router/fraction_dropped", spec.as_estimator_spec().eval_metric_ops)
      fn, tensors = spec.eval_metrics
      metrics = fn(*tensors)
      self.assertEqual(set(metrics), {"neg_log_perplexity", "dec/router/fraction_dropped"})
      value, update = metrics["dec/router/fraction_dropped"]
      with tf.Session() as sess:
        sess.run(tf.local_variables_initializer())
        for b in (0.1, 0.3, 0.8):  # three evaluation batches
          sess.run(update, {batch: b, xent: [1.0, 2.0]})
        self.assertAlmostEqual(sess.run(value), 0.4, places=6)  # (0.1 + 0.3 + 0.8) / 3


class ModelFnBuilderTest(absltest.TestCase):

  def build(self, **kwargs):
    original = mock.Mock(return_value="model_fn")
    wrapped = summaries.model_fn_builder(original)
    model_fn = wrapped(model_type="bitransformer", model_dir="/m", **kwargs)
    return original, model_fn

  def test_tpu_turns_on_mtf_host_call_and_cpu_keeps_the_collection(self):
    original, _ = self.build(use_tpu="my-tpu")
    self.assertIs(original.call_args.kwargs["tpu_summaries"], True)
    original, _ = self.build(use_tpu=None, tpu_summaries=True)
    self.assertIs(original.call_args.kwargs["tpu_summaries"], False)

  def test_disabled_by_gin_leaves_upstream_untouched(self):
    with gin.unlock_config():
      gin.bind_parameter("st_moe.event_summaries.enabled", False)
    try:
      original, model_fn = self.build(use_tpu=None)
    finally:
      gin.clear_config()
    self.assertEqual(model_fn, "model_fn")
    self.assertNotIn("tpu_summaries", original.call_args.kwargs)

  def test_install_is_idempotent_and_uninstall_restores(self):
    from mesh_tensorflow.transformer import utils as mtf_utils  # pylint: disable=g-import-not-at-top
    summaries.uninstall()
    upstream = mtf_utils.tpu_estimator_model_fn
    self.assertTrue(summaries.install())
    self.assertFalse(summaries.install())
    self.assertIsNot(mtf_utils.tpu_estimator_model_fn, upstream)
    summaries.uninstall()
    self.assertIs(mtf_utils.tpu_estimator_model_fn, upstream)
    summaries.install()

  def test_bad_flush_setting_is_named(self):
    with self.assertRaisesRegex(ValueError, r"flush_secs=-1: give seconds >= 0"):
      summaries.settings(flush_secs=-1)


if __name__ == "__main__":
  absltest.main()
