"""TF1 graph mode for one test module, without leaking it into the modules that follow.

mtf tests build tf.Graphs and run them in tf.Sessions, which needs TF1 behaviour; the SeqIO task
tests iterate datasets eagerly. pytest imports every test module before running any, so a
module-level `tf.disable_v2_behavior()` would switch the whole run to graph mode. Instead, a graph
test module binds

  setUpModule = graph_mode.enter
  tearDownModule = graph_mode.leave

and eager execution is back when its tests are done.
"""
import tensorflow.compat.v1 as tf


def enter():
  tf.disable_v2_behavior()


def leave():
  # enable_v2_behavior refuses once the global default graph has been used; resetting it first is
  # what makes the switch back to eager legal.
  tf.reset_default_graph()
  tf.enable_v2_behavior()
