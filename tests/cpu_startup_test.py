"""st_moe.cpu_startup: Grappler off in the default session config, input pipelines built without
AutoGraph, each only when asked; the embedded tasks' batches are the same either way."""
import hashlib
import os
from unittest import mock

from absl.testing import absltest
import gin
import numpy as np
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorflow.python.autograph.core import ag_ctx
import tensorflow.compat.v1 as tf
from tensorflow_estimator.python.estimator import estimator as estimator_lib
from tensorflow_estimator.python.estimator import run_config
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

import graph_mode
from st_moe import cpu_startup
import st_moe.register  # pylint: disable=unused-import  (installs the patches, as runs do)

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave


def batches(task, n=3):
  """md5 of the first n batches of the seeded training pipeline, as t5_mesh_transformer builds it."""
  from st_moe.experiments import seeding  # pylint: disable=g-import-not-at-top
  from t5.models import mesh_transformer  # pylint: disable=g-import-not-at-top,unused-import
  gin.bind_parameter("mesh_train_dataset_fn.mixture_or_task_name", task)
  gin.bind_parameter("mesh_train_dataset_fn.use_cached", False)
  with tf.Graph().as_default():
    ds = seeding.seeded_train_dataset_fn({"inputs": 32, "targets": 8}, None, "train", seed=0)
    batch = tf.data.make_one_shot_iterator(ds.batch(4)).get_next()
    with tf.Session() as session:
      found = []
      for _ in range(n):
        b = session.run(batch)
        found.append(hashlib.md5(b"".join(np.ascontiguousarray(b[k]).tobytes()
                                          for k in sorted(b))).hexdigest())
  return found


class CpuStartupTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  @mock.patch.dict(os.environ, {cpu_startup.META_OPTIMIZER_ENV: "1"})  # tests/conftest.py sets 0
  def test_session_config(self):
    self.assertIs(run_config.get_default_session_config, cpu_startup.session_config)
    upstream = run_config.get_default_session_config()  # meta_optimizer=True: upstream's
    self.assertTrue(upstream.allow_soft_placement)
    self.assertEqual(upstream.graph_options.rewrite_options.meta_optimizer_iterations,
                     rewriter_config_pb2.RewriterConfig.ONE)
    self.assertFalse(upstream.graph_options.rewrite_options.disable_meta_optimizer)
    gin.bind_parameter("st_moe.cpu_startup.meta_optimizer", False)
    off = run_config.get_default_session_config()
    self.assertTrue(off.graph_options.rewrite_options.disable_meta_optimizer)
    self.assertTrue(off.allow_soft_placement)
    gin.clear_config()
    with mock.patch.dict(os.environ, {cpu_startup.META_OPTIMIZER_ENV: "0"}):
      self.assertTrue(
          run_config.get_default_session_config().graph_options.rewrite_options
          .disable_meta_optimizer)

  def test_input_fn_runs_with_autograph_off_only_when_asked(self):
    seen = []

    def input_fn():
      seen.append(ag_ctx.control_status_ctx().status)

    for cls in (estimator_lib.Estimator, tpu_estimator.TPUEstimator):
      self.assertTrue(hasattr(cls._call_input_fn, "_st_moe_cpu_startup"), cls)  # pylint: disable=protected-access
    call = cpu_startup._without_autograph(lambda self, fn: fn())  # pylint: disable=protected-access
    call(None, input_fn)
    gin.bind_parameter("st_moe.cpu_startup.autograph_input", False)
    call(None, input_fn)
    self.assertEqual(seen, [ag_ctx.Status.UNSPECIFIED, ag_ctx.Status.DISABLED])

  def test_embedded_tasks_batches_are_the_same_without_autograph(self):
    import st_moe.tasks  # pylint: disable=g-import-not-at-top,unused-import
    from st_moe.experiments.tables import common  # pylint: disable=g-import-not-at-top
    for task in (common.DEFAULT_TASK, common.SCALE_TASKS["small"]):
      with_autograph = batches(task)
      with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
        without = batches(task)
      self.assertEqual(with_autograph, without, task)
      self.assertLen(set(without), 3)


if __name__ == "__main__":
  absltest.main()
