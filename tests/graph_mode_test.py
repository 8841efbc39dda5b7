"""tests/graph_mode.py's repair of TensorFlow's context stacks, which tests/conftest.py runs after
every test: the state it repairs breaks eager SeqIO pipelines (shown here); after it, they work."""
import gc
import threading

from absl.testing import absltest
import tensorflow as tf
from tensorflow.python.eager import context

import graph_mode


def cond_dataset_values():
  """A dataset whose map function traces a tf.cond (nested functions, as SeqIO's packing has)."""
  ds = tf.data.Dataset.range(3).map(lambda x: tf.cond(x > 1, lambda: x * 10, lambda: x + 1))
  return [int(v) for v in ds.as_numpy_iterator()]


class RestoreFreshStacksTest(absltest.TestCase):

  def tearDown(self):
    graph_mode.restore_fresh_stacks()
    super().tearDown()

  def test_fresh_stacks_are_left_alone(self):
    switches = context.context().context_switches.stack
    before = list(switches)
    self.assertEqual(graph_mode.restore_fresh_stacks(), "")
    self.assertEqual([e.enter_context_fn for e in switches], [e.enter_context_fn for e in before])
    self.assertEqual(cond_dataset_values(), [1, 2, 20])  # x + 1, x + 1, x * 10 by hand

  def test_a_graph_entry_left_above_eager_breaks_traced_conds_until_restored(self):
    graph = tf.Graph()
    context.context().context_switches.push(False, graph.as_default, None)  # entered, never left
    self.assertTrue(tf.executing_eagerly())  # the top level does not see it
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"Unable to find FunctionDef for cond_(true|false)_\d+"):
      cond_dataset_values()
    wrong = graph_mode.restore_fresh_stacks()
    self.assertIn("context-switch entry graph", wrong)
    self.assertLen(context.context().context_switches.stack, 1)
    self.assertEqual(cond_dataset_values(), [1, 2, 20])

  def test_a_missing_eager_entry_is_put_back(self):
    context.context().context_switches.pop()
    self.assertEqual(graph_mode.restore_fresh_stacks(),
                     "no eager entry at the bottom of the context-switch stack")
    self.assertEqual(cond_dataset_values(), [1, 2, 20])

  def test_a_generator_left_in_a_graph_on_another_thread_and_closed_here(self):
    # One way to the state of the failed CI run: a generator that yields inside
    # `with graph.as_default()` (as tfds.as_numpy's graph-mode iterator does), started on another
    # thread and closed on this one, pops this thread's eager entry on its way out.
    def inside_a_graph():
      with tf.Graph().as_default():
        yield 1
        yield 2

    started = {}

    def start():
      started["generator"] = inside_a_graph()
      next(started["generator"])

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    del started["generator"]
    gc.collect()
    self.assertEmpty(context.context().context_switches.stack)
    self.assertTrue(tf.executing_eagerly())
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "Unable to find FunctionDef"):
      cond_dataset_values()
    self.assertEqual(graph_mode.restore_fresh_stacks(),
                     "no eager entry at the bottom of the context-switch stack")
    self.assertEqual(cond_dataset_values(), [1, 2, 20])


if __name__ == "__main__":
  absltest.main()
