"""Whether a run writes its TensorFlow graph into the model folder (off on the CPU layout).

A TF1 Estimator run writes its whole graph three ways: `graph.pbtxt` (text), a `model.ckpt-N.meta`
beside every checkpoint, and the graph with its meta graph in the model folder's event file (and
in each `eval_*` folder's). Mesh TensorFlow's graphs are large and TensorFlow serializes them in
Python: st_moe_tiny's training graph has 21,600 nodes, a 13 MB `graph.pbtxt`, a 6.4 MB `.meta` per
checkpoint and 12 MB in the event file, and on this project's 2-core CPU writing them took 87 s of
a 152 s four-step run (65 s without). Nothing reads them back: checkpoints restore from their
`.index` and `.data` files, t5_mesh_transformer rebuilds the graph from gin, and st-moe's tools read
only scalars and checkpoints. What is lost is TensorBoard's "Graphs" tab.

    st_moe.graph_files.write = False   # gin/layouts/cpu.gin; elsewhere True (upstream's way)

`install()` (called once by `st_moe.register`) patches three upstream points, all read after gin
is parsed, when a run's hooks are built or its session starts:

  * `tf.train.CheckpointSaverHook.__init__`: `save_graph_def=False` (no `graph.pbtxt`, no `.meta`);
    mesh_tensorflow builds its own saver hook without that argument;
  * `tf.summary.FileWriterCache.get`: the cached writer of a folder is made without the graph
    and ignores `add_graph` / `add_meta_graph` (the saver hook adds both on session start);
  * `tf.train.CheckpointSaverHook.after_create_session`: saves the session-start checkpoint without
    first serializing the graph into a meta graph. Upstream builds that meta graph even with
    `save_graph_def=False`, for the event file only, where the writer above drops it: an
    `as_graph_def` pass over st_moe_tiny's graph and the meta graph built from it, ~15 s of a
    2-step CPU run (cProfile, 2-core machine under load).

With `write = True` all three behave exactly as upstream. `uninstall()` puts them back (tests).
"""
import gin
import tensorflow.compat.v1 as tf
from tensorflow.python.summary.writer import writer as tf_writer
from tensorflow.python.summary.writer import writer_cache
from tensorflow.python.training import basic_session_run_hooks

_ORIGINALS = {}


@gin.configurable("st_moe.graph_files")
def settings(write=True):
  """Whether runs write their graph (graph.pbtxt, .meta per checkpoint, graph in event files)."""
  return {"write": bool(write)}


def _write():
  return settings()["write"]


class GraphlessFileWriter(tf_writer.FileWriter):
  """A FileWriter that writes summaries and session logs but never the graph."""

  def add_graph(self, graph, global_step=None, graph_def=None):
    del graph, global_step, graph_def

  def add_meta_graph(self, meta_graph_def, global_step=None):
    del meta_graph_def, global_step


def _saver_hook_init(self, *args, **kwargs):
  if not _write():
    kwargs["save_graph_def"] = False
  _ORIGINALS["saver_hook_init"](self, *args, **kwargs)


def _saver_hook_after_create_session(self, session, coord):
  if _write():
    _ORIGINALS["saver_hook_after_create_session"](self, session, coord)
    return
  # Upstream's steps without the graph: the checkpoint of the session's starting step.
  global_step = session.run(self._global_step_tensor)  # pylint: disable=protected-access
  self._save(session, global_step)  # pylint: disable=protected-access
  self._timer.update_last_triggered_step(global_step)  # pylint: disable=protected-access


def _cached_writer(logdir):
  if _write():
    return _ORIGINALS["cache_get"](logdir)
  cache = writer_cache.FileWriterCache
  with cache._lock:  # pylint: disable=protected-access
    if logdir not in cache._cache:  # pylint: disable=protected-access
      cache._cache[logdir] = GraphlessFileWriter(logdir)  # pylint: disable=protected-access
    return cache._cache[logdir]  # pylint: disable=protected-access


def install():
  """Patches the saver hook and the writer cache (once per process); returns whether it did."""
  if _ORIGINALS:
    return False
  _ORIGINALS["saver_hook_init"] = basic_session_run_hooks.CheckpointSaverHook.__init__
  _ORIGINALS["cache_get"] = writer_cache.FileWriterCache.get
  _ORIGINALS["saver_hook_after_create_session"] = (
      basic_session_run_hooks.CheckpointSaverHook.after_create_session)
  basic_session_run_hooks.CheckpointSaverHook.__init__ = _saver_hook_init
  basic_session_run_hooks.CheckpointSaverHook.after_create_session = (
      _saver_hook_after_create_session)
  writer_cache.FileWriterCache.get = staticmethod(_cached_writer)
  tf.logging.info("st_moe.graph_files: st_moe.graph_files.write=False (gin/layouts/cpu.gin) keeps "
                  "graph.pbtxt, .meta files and the graph in event files out of the model folder")
  return True


def uninstall():
  """Puts back the upstream saver hook and writer cache (tests)."""
  if not _ORIGINALS:
    return
  basic_session_run_hooks.CheckpointSaverHook.__init__ = _ORIGINALS.pop("saver_hook_init")
  basic_session_run_hooks.CheckpointSaverHook.after_create_session = _ORIGINALS.pop(
      "saver_hook_after_create_session")
  writer_cache.FileWriterCache.get = staticmethod(_ORIGINALS.pop("cache_get"))
