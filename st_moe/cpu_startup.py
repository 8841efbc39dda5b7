"""Two settings that shorten the start of a CPU run of `t5_mesh_transformer`.

A tiny 2-step training (st_moe_tiny, batch 4 x 64/16 tokens) took 88 and 92 s here with upstream's
settings, 74 and 74 s with both off (docs/performance.md, "Start-up of a CPU run"). Of the 88:
  * ~10 s building the input pipeline, almost all of it AutoGraph transpiling SeqIO's and t5's
    preprocessing functions (`dataset.map`), which are written for graph mode and need none;
  * ~16 s in Grappler, TensorFlow's graph optimiser, at session creation. Estimator's default
    session config runs it once over the whole lowered graph on the CPU; mesh_tensorflow already
    turns it off on a TPU ("meta-optimizer drastically slows down startup time").

`st_moe.cpu_startup.autograph_input = False` builds every Estimator input pipeline with AutoGraph
off: the data are the same (tests/cpu_startup_test.py compares the batches) and
`gin/layouts/cpu.gin` sets it. `st_moe.cpu_startup.meta_optimizer = False` (or the environment's
ST_MOE_META_OPTIMIZER=0) gives a session config with Grappler off when the run gives none (a TPU
run's own config is left alone). It stays on by default: its rewrites make a step faster (the
small sparse model: 2968 tokens/s with it, 2593 without, 60 steps each), which pays off after a
few dozen steps. Short runs turn it off: `make test` does (tests/conftest.py).
"""
import functools
import os

import gin
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorflow.python.autograph.core import ag_ctx
import tensorflow.compat.v1 as tf
from tensorflow_estimator.python.estimator import estimator as estimator_lib
from tensorflow_estimator.python.estimator import run_config
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

_PATCHED_ATTR = "_st_moe_cpu_startup"
META_OPTIMIZER_ENV = "ST_MOE_META_OPTIMIZER"
_UPSTREAM_SESSION_CONFIG = run_config.get_default_session_config


@gin.configurable("st_moe.cpu_startup")
def settings(autograph_input=True, meta_optimizer=True):
  """Whether input pipelines are AutoGraph-converted and sessions run Grappler (upstream: both)."""
  return dict(autograph_input=autograph_input, meta_optimizer=meta_optimizer)


def session_config():
  """Estimator's default session config, with Grappler off under meta_optimizer=False or
  ST_MOE_META_OPTIMIZER=0."""
  config = _UPSTREAM_SESSION_CONFIG()
  if not settings()["meta_optimizer"] or os.environ.get(META_OPTIMIZER_ENV) == "0":
    config.graph_options.rewrite_options.CopyFrom(
        rewriter_config_pb2.RewriterConfig(disable_meta_optimizer=True))
  return config


def _without_autograph(call_input_fn):

  @functools.wraps(call_input_fn)
  def wrapped(self, *args, **kwargs):
    if settings()["autograph_input"]:
      return call_input_fn(self, *args, **kwargs)
    with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
      return call_input_fn(self, *args, **kwargs)

  setattr(wrapped, _PATCHED_ATTR, call_input_fn)
  return wrapped


def install():
  """Patches Estimator's input-fn call and default session config (once per process)."""
  if hasattr(estimator_lib.Estimator._call_input_fn, _PATCHED_ATTR):  # pylint: disable=protected-access
    return False
  # TPUEstimator (t5_mesh_transformer's, on the CPU too) overrides the method without calling it.
  for cls in (estimator_lib.Estimator, tpu_estimator.TPUEstimator):
    cls._call_input_fn = _without_autograph(cls._call_input_fn)  # pylint: disable=protected-access
  run_config.get_default_session_config = session_config
  tf.logging.info("st_moe.cpu_startup: st_moe.cpu_startup.autograph_input=False (gin/layouts/"
                  "cpu.gin) and .meta_optimizer=False (or ST_MOE_META_OPTIMIZER=0) shorten a CPU "
                  "run's start")
  return True
