"""st_moe.graph_files: with write=False a training session leaves no graph.pbtxt, no .meta and no
graph event in its folder, and still its checkpoints and scalar summaries; with write=True (the
default) exactly what upstream TensorFlow writes."""
import glob
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import gin
import tensorflow.compat.v1 as tf

import graph_mode
from st_moe import graph_files
import st_moe.register  # pylint: disable=unused-import  (installs the patch, as runs do)

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave


def train_two_steps(model_dir):
  """A two-step TF1 training session with the saver and summary hooks an Estimator run uses."""
  with tf.Graph().as_default():
    step = tf.train.get_or_create_global_step()
    w = tf.get_variable("w", [3], initializer=tf.ones_initializer())
    loss = tf.reduce_sum(w * w)
    tf.summary.scalar("loss", loss)
    train_op = tf.group(tf.assign_sub(w, 0.1 * w), tf.assign_add(step, 1))
    hooks = [tf.train.CheckpointSaverHook(model_dir, save_steps=1),
             tf.train.SummarySaverHook(save_steps=1, output_dir=model_dir,
                                       summary_op=tf.summary.merge_all())]
    with tf.train.MonitoredSession(hooks=hooks) as session:
      for _ in range(2):
        session.run(train_op)
  tf.summary.FileWriterCache.clear()


def event_kinds(model_dir):
  """Which event fields the folder's event files hold, and the scalar tags."""
  kinds, tags = set(), set()
  for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    for event in tf.train.summary_iterator(path):
      kinds.add(event.WhichOneof("what"))
      tags.update(v.tag for v in event.summary.value)
  return kinds, tags


class GraphFilesTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def run_with(self, write):
    """Trains two steps; returns the folder, its files and how often the graph was serialized."""
    gin.bind_parameter("st_moe.graph_files.write", write)
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    model_dir = tmp.name
    serialized = []
    upstream = tf.Graph.as_graph_def

    def counted(graph, *args, **kwargs):
      serialized.append(1)
      return upstream(graph, *args, **kwargs)
    with mock.patch.object(tf.Graph, "as_graph_def", counted):
      train_two_steps(model_dir)
    self.serialized = len(serialized)
    return model_dir, sorted(os.listdir(model_dir))

  def test_write_false_leaves_checkpoints_and_scalars_but_no_graph(self):
    model_dir, files = self.run_with(False)
    self.assertNotIn("graph.pbtxt", files)
    self.assertEqual([f for f in files if f.endswith(".meta")], [])
    for step in (0, 1, 2):  # on session start, then every step
      self.assertIn(f"model.ckpt-{step}.index", files)
    kinds, tags = event_kinds(model_dir)
    self.assertNotIn("graph_def", kinds)
    self.assertNotIn("meta_graph_def", kinds)
    self.assertIn("loss", tags)
    # Nor is the graph serialized for nothing (upstream's session start does it twice, below).
    self.assertEqual(self.serialized, 0)

  def test_write_true_is_upstreams_behaviour(self):
    model_dir, files = self.run_with(True)
    self.assertIn("graph.pbtxt", files)
    self.assertIn("model.ckpt-2.meta", files)
    kinds, _ = event_kinds(model_dir)
    self.assertIn("graph_def", kinds)
    self.assertIn("meta_graph_def", kinds)
    self.assertGreaterEqual(self.serialized, 2)  # graph.pbtxt and the meta graph, at least

  def test_install_is_idempotent_and_uninstall_restores(self):
    from tensorflow.python.summary.writer import writer_cache  # pylint: disable=g-import-not-at-top
    from tensorflow.python.training import basic_session_run_hooks as hooks  # pylint: disable=g-import-not-at-top,line-too-long
    graph_files.uninstall()
    upstream = (hooks.CheckpointSaverHook.__init__, writer_cache.FileWriterCache.get,
                hooks.CheckpointSaverHook.after_create_session)
    try:
      self.assertTrue(graph_files.install())
      self.assertFalse(graph_files.install())
      self.assertIsNot(hooks.CheckpointSaverHook.__init__, upstream[0])
      graph_files.uninstall()
      self.assertIs(hooks.CheckpointSaverHook.__init__, upstream[0])
      self.assertIs(writer_cache.FileWriterCache.get, upstream[1])
      self.assertIs(hooks.CheckpointSaverHook.after_create_session, upstream[2])
    finally:
      graph_files.install()

  def test_cpu_layout_turns_it_off(self):
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin",
                           "layouts", "cpu.gin")) as f:
      self.assertIn("st_moe.graph_files.write = False", f.read().splitlines())


if __name__ == "__main__":
  absltest.main()
