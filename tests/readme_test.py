"""The README's "Adding your own task" example, run as written: `my_tasks.py` and its test are taken
from the README's code blocks, written to a temporary folder and run there.

If the README's example stops working (an API it uses changes, a promise its prose makes is not
checked), this fails, so the README says what is true.
"""
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks():
  with open(os.path.join(REPO, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


class ReadmeExampleTest(absltest.TestCase):

  def test_adding_your_own_task_example_passes(self):
    blocks = readme_blocks()
    module = [b for b in blocks if b.startswith("# my_tasks.py")]
    test = [b for b in blocks if "class MyTaskTest" in b]
    self.assertLen(module, 1)
    self.assertLen(test, 1)
    # The prose promises the test checks the metric on gold answers.
    self.assertIn("fn(gold, gold)", test[0])
    with tempfile.TemporaryDirectory() as tmp:
      with open(os.path.join(tmp, "my_tasks.py"), "w") as f:
        f.write(module[0])
      with open(os.path.join(tmp, "my_tasks_test.py"), "w") as f:
        f.write(test[0])
      env = dict(os.environ, PYTHONPATH=tmp, TF_CPP_MIN_LOG_LEVEL="2")
      proc = subprocess.run([sys.executable, "my_tasks_test.py"], cwd=tmp, env=env,
                            capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    self.assertRegex(proc.stderr, r"Ran 3 tests")
    self.assertIn("OK", proc.stderr.splitlines()[-1])


if __name__ == "__main__":
  absltest.main()
