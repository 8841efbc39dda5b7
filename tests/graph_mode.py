"""TF1 graph mode for one test module, without leaking it into the modules that follow.

mtf tests build tf.Graphs and run them in tf.Sessions, which needs TF1 behaviour; the SeqIO task
tests iterate datasets eagerly. pytest imports every test module before running any, so a
module-level `tf.disable_v2_behavior()` would switch the whole run to graph mode. Instead, a graph
test module binds

  setUpModule = graph_mode.enter
  tearDownModule = graph_mode.leave

and eager execution is back when its tests are done.

Between two tests, the main thread's TensorFlow context stacks must also be as a fresh process has
them: one eager entry on the context-switch stack, no default graph entered. A graph entry left
above the eager one (a graph context entered and never left, or left out of order) is invisible to
eager code at the top level, but `tf.init_scope` inside a function being traced (a `dataset.map`)
then lifts into that graph instead of the eager context, so the nested functions of every traced
`tf.cond` or `tf.while_loop` are never registered with the eager context, and every later dataset
that has one fails at `MakeIterator` with "Unable to find FunctionDef for cond_true_N in the
registry" (a CI run on 2026-12-06: 21 SeqIO tests on one worker, none on the other). The same
follows when the eager entry is gone, which a generator suspended inside `with graph.as_default()`
on another thread does when it is closed on this one: it pops this thread's top entry
(tests/graph_mode_test.py shows both).
tests/conftest.py calls `restore_fresh_stacks` after every test and reports the test that left
them otherwise.
"""
from tensorflow.python.eager import context
from tensorflow.python.framework import ops
import tensorflow.compat.v1 as tf


def enter():
  tf.disable_v2_behavior()


def leave():
  # enable_v2_behavior refuses once the global default graph has been used; resetting it first is
  # what makes the switch back to eager legal.
  tf.reset_default_graph()
  tf.enable_v2_behavior()


def _is_eager_entry(entry):
  return not entry.is_building_function and entry.enter_context_fn is context.eager_mode


def _graph_name(graph):
  return getattr(graph, "name", None) or type(graph).__name__  # a FuncGraph has a name


def _describe(entry):
  """A context-switch entry as text: the graph whose as_default it enters, or the function."""
  enter = entry.enter_context_fn
  graph = getattr(enter, "__self__", None)
  what = (f"graph {_graph_name(graph)!r}" if graph is not None
          else getattr(enter, "__qualname__", repr(enter)))
  return what + (" (building a function)" if entry.is_building_function else "")


def restore_fresh_stacks():
  """Puts the main thread's context-switch and default-graph stacks back as a fresh process has
  them (the eager entry only; no graph entered). Returns what was there beyond that, as text, or
  "" if nothing was."""
  switches = context.context().context_switches.stack
  graphs = ops._default_graph_stack.stack  # pylint: disable=protected-access
  eager_at_bottom = bool(switches) and _is_eager_entry(switches[0])
  wrong = [] if eager_at_bottom else ["no eager entry at the bottom of the context-switch stack"]
  wrong += [f"context-switch entry {_describe(e)}" for e in switches[int(eager_at_bottom):]]
  wrong += [f"default graph {_graph_name(g)!r} still entered" for g in graphs]
  if wrong:
    del switches[:]
    context.context().context_switches.push(
        is_building_function=False, enter_context_fn=context.eager_mode, device_stack=None)
    del graphs[:]
  return "; ".join(wrong)
