"""Real checkpoints for tests, written by tf.train.Saver as mesh_tensorflow writes them.

`write_checkpoints` saves model.ckpt-1 .. model.ckpt-<steps> (sharded, relative paths, with the
`checkpoint` file naming the last), each of three small variables whose values differ per step;
`DATA_BYTES` is the size of one step's tensors, worked out by hand, and `truncate` cuts a file short
(a partial write). `restore` reads a checkpoint back with tf.train.Saver itself, the independent
reference for whether it can be read.
"""
import os

import tensorflow.compat.v1 as tf

DATA_BYTES = 3 * 5 * 4 + 7 * 4 + 8  # a <float32>[3, 5], b <int32>[7], global_step <int64>[]


def write_checkpoints(model_dir, steps=3):
  """model.ckpt-1 .. model.ckpt-<steps> in model_dir (a = 1 + step); returns their prefixes."""
  os.makedirs(model_dir, exist_ok=True)
  graph = tf.Graph()
  with graph.as_default():
    step = tf.train.get_or_create_global_step()
    a = tf.get_variable("a", [3, 5], initializer=tf.ones_initializer())
    tf.get_variable("b", [7], dtype=tf.int32, initializer=tf.zeros_initializer())
    update = tf.group(tf.assign_add(step, 1), tf.assign_add(a, tf.ones([3, 5])))
    saver = tf.train.Saver(sharded=True, save_relative_paths=True, max_to_keep=None)
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      for _ in range(steps):
        session.run(update)
        saver.save(session, os.path.join(model_dir, "model.ckpt"), global_step=step)
  return [os.path.join(model_dir, f"model.ckpt-{s}") for s in range(1, steps + 1)]


def data_file(prefix):
  """The one data shard of a checkpoint written by write_checkpoints."""
  return prefix + ".data-00000-of-00001"


def restore(prefix):
  """Restores `prefix` with tf.train.Saver (the reference for "readable"); returns a's value."""
  graph = tf.Graph()
  with graph.as_default():
    tf.train.get_or_create_global_step()
    a = tf.get_variable("a", [3, 5])
    tf.get_variable("b", [7], dtype=tf.int32)
    saver = tf.train.Saver()
    with tf.Session() as session:
      saver.restore(session, prefix)
      return session.run(a)


def truncate(path, size):
  """Keeps the first `size` bytes of the file at `path`."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:size])
