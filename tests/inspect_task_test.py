"""tools/inspect_task.py --module_import: a user's own task (tests/testing_tasks.py) is inspected.

The expected text comes from the task's source, read here independently: the validation split is
the last 8 of Python's pydoc topics, and the byte vocabulary spells byte b as id b + 3, so every
run of ids between span-corruption sentinels must spell a piece of that text.
"""
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
from pydoc_data import topics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "inspect_task.py")
TASK = "st_moe_test_bytes_span_corruption"


def run_tool(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests")] +
                                        [p for p in [os.environ.get("PYTHONPATH")] if p]))
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        timeout=600, cwd=tempfile.gettempdir(), env=env)


class InspectTaskTest(absltest.TestCase):

  def test_own_task_through_module_import(self):
    proc = run_tool("--module_import=testing_tasks", f"--task={TASK}", "--split=validation",
                    "--n=1", "--inputs_length=64", "--targets_length=16")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f"--- example 0 ({TASK}, split validation)", proc.stdout)
    ids = eval(re.search(r"^inputs \(\d+ ids\): (\[.*\])$", proc.stdout, re.M).group(1))  # pylint: disable=eval-used
    first_text = [t for _, t in sorted(topics.topics.items())][-8].encode("utf-8")
    pieces, piece = [], []
    for i in ids:
      if 3 <= i < 259:  # a byte; 0 pad, 1 EOS, 2 UNK, >= 259 sentinels
        piece.append(i - 3)
      elif piece:
        pieces.append(bytes(piece))
        piece = []
    if piece:
      pieces.append(bytes(piece))
    self.assertNotEmpty(pieces)
    for p in pieces:
      self.assertIn(p, first_text)
    self.assertGreaterEqual(sum(map(len, pieces)), 30)

  def test_unknown_task_says_module_import(self):
    proc = run_tool(f"--task={TASK}")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(f"--task='{TASK}' is not a registered task (your own task: add "
                  "--module_import=", proc.stderr)


if __name__ == "__main__":
  absltest.main()
