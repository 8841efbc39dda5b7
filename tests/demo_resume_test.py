"""End-to-end: a `make demo` killed by its PID and rerun, and a demo whose model diverges.

Beside tests/demo_test.py (whose helpers it uses), so the two files' demo runs go side by side.
"""
import json
import math
import os
import signal
import subprocess
import tempfile
import time

from absl.testing import absltest

import demo_test
from st_moe.experiments import runner

STEPS, EVERY = demo_test.STEPS, demo_test.EVERY


class KilledDemoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.TemporaryDirectory()
    self.addCleanup(self.tmp.cleanup)

  def test_killed_demo_resumes_to_the_uninterrupted_curve(self):
    out = os.path.join(self.tmp.name, "killed")
    os.makedirs(out)
    model_dir = os.path.join(out, "st_moe_tiny")
    with open(os.path.join(self.tmp.name, "killed.log"), "w") as log:
      proc = subprocess.Popen(demo_test.demo_cmd(out, models=("st_moe_tiny",)), stdout=log,
                              stderr=subprocess.STDOUT)
      deadline = time.monotonic() + 1200
      while (not os.path.exists(os.path.join(model_dir, f"model.ckpt-{EVERY}.index"))
             and proc.poll() is None and time.monotonic() < deadline):
        time.sleep(0.2)
      self.assertIsNone(proc.poll(), "the demo ended before its first checkpoint")
      os.kill(proc.pid, signal.SIGTERM)
      proc.wait(timeout=120)
    time.sleep(3)
    survivors = demo_test.processes_naming(f"--model_dir={model_dir}")
    for pid in survivors:  # leave nothing running, whatever the outcome
      os.kill(pid, signal.SIGKILL)
    self.assertEqual(survivors, [], "t5_mesh_transformer outlived the demo killed by its PID")
    rerun = demo_test.run_demo(out, models=("st_moe_tiny",))
    self.assertEqual(rerun.returncode, 0, demo_test._log(rerun))
    self.assertIn(f"[st_moe_tiny] training steps {EVERY + 1}..{STEPS} (resuming from its "
                  "checkpoint)", rerun.stdout)
    # An uninterrupted run of STEPS steps has one loss per step, 1..STEPS, in its event files
    # (demo_test.DemoTest checks that of its own run); so must the killed-and-resumed one.
    steps, losses = runner.steps_and_losses(model_dir)
    self.assertEqual(steps, list(range(1, STEPS + 1)))
    self.assertLen(losses, STEPS)
    self.assertTrue(all(math.isfinite(v) for v in losses), losses)
    with open(os.path.join(model_dir, "eval.json")) as f:
      self.assertEqual(json.load(f)["step"], STEPS)


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
