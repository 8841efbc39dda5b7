"""pytest's order of the test files: the slowest first, so that `make test`'s two workers end together.

pytest.ini runs the files on two workers, one file at a time per worker (`--dist loadfile`) and
in collection order (`--no-loadscope-reorder`). xdist would otherwise start the files with the most
tests first, which leaves a file with few but slow tests (a whole demo run) for the end, when the
other worker is idle. SLOWEST_FIRST lists the files whose class fixtures train models, slowest
first (measured with `pytest --durations=60`: docs/performance.md); every other file follows in
its usual order. A file missing from the list only costs balance, never a test.
"""

import os
import warnings

import pytest

import graph_mode
from st_moe import cpu_startup

# Every t5_mesh_transformer the tests start trains a few steps: Grappler's ~15 s per process at
# session creation would never pay off (st_moe/cpu_startup.py). Inherited by every subprocess.
os.environ.setdefault(cpu_startup.META_OPTIMIZER_ENV, "0")

SLOWEST_FIRST = (
    "reproduce_test.py",
    "finetune_tables_test.py",
    "demo_test.py",
    "finetune_test.py",
    "upcycle_test.py",
    "runner_test.py",
    "decoding_test.py",
    "demo_diverged_test.py",
)


def _rank(item):
  name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
  return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  items.sort(key=_rank)  # stable: a file's tests, and the other files, keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):  # pylint: disable=unused-argument
  """After every test (its module's tearDownModule included): TensorFlow's context stacks as a fresh
  process has them, or a warning naming the test that left them otherwise (tests/graph_mode.py)."""
  yield
  wrong = graph_mode.restore_fresh_stacks()
  if wrong:
    warnings.warn(f"{item.nodeid} left TensorFlow's context stacks changed ({wrong}); restored, "
                  "so that later SeqIO tests' traced tf.cond/while functions reach the eager "
                  "context", RuntimeWarning)
