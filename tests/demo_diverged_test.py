"""End-to-end: a `make demo` whose model diverges fails, is not evaluated, and stays diverged.

Beside tests/demo_test.py (whose helpers it uses), so the two files' demo runs go side by side.
"""
import os
import tempfile

from absl.testing import absltest

import demo_test


class DivergedDemoTest(absltest.TestCase):

  def test_diverged_model_fails_the_demo_and_is_not_evaluated(self):
    with tempfile.TemporaryDirectory() as out:
      proc = demo_test.run_demo(out, models=("st_moe_tiny",), gin_params=demo_test.DIVERGING)
      self.assertEqual(proc.returncode, 1, demo_test._log(proc))
      last = proc.stdout.strip().splitlines()[-1]
      self.assertRegex(last, r"(?i)^demo FAILED: st_moe_tiny diverged at step \d+: .*(nan|inf)")
      model_dir = os.path.join(out, "st_moe_tiny")
      self.assertFalse(os.path.exists(os.path.join(model_dir, "eval.json")))
      self.assertFalse(os.path.exists(os.path.join(out, "routing", "routing.json")))
      with open(os.path.join(out, "report.md")) as f:
        report = f.read()
      self.assertRegex(report, r"\| st_moe_tiny \|.*\| diverged \|")
      # The rerun keeps it as diverged, trains nothing, and fails again.
      again = demo_test.run_demo(out, models=("st_moe_tiny",), gin_params=demo_test.DIVERGING)
      self.assertEqual(again.returncode, 1, demo_test._log(again))
      self.assertIn("[st_moe_tiny] already diverged", again.stdout)
      self.assertNotIn("training steps", again.stdout)
      self.assertEqual(again.stdout.strip().splitlines()[-1], last)


if __name__ == "__main__":
  absltest.main()
