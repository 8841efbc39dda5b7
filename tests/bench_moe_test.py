"""Smoke test of tools/bench_moe.py: one tiny configuration, few steps.

Checks only that the tool runs end to end and that, on the same weights and input, our SparseFFN
and upstream mesh_tensorflow MoE1D give the same output (the numbers of a 2-core CI machine are
not asserted: the performance targets live in docs/performance.md).
"""
import json
import os
import subprocess
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_moe.py")
TINY = ["--d_model=16", "--hidden=32", "--batch=2", "--length=32", "--group_size=32",
        "--warmup=1", "--reps=2"]


def run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


class BenchMoeTest(absltest.TestCase):

  def test_tiny_sweep_runs_and_layers_agree(self):
    proc = run_tool("--experts=2,4", "--json", *TINY)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    self.assertLen(lines, 2, proc.stdout)
    for experts, line in zip((2, 4), lines):
      r = json.loads(line)
      self.assertEqual(r["experts"], experts)
      for key in ("ours_ms", "upstream_ms", "speedup", "ours_efficiency",
                  "upstream_efficiency", "matmul_gflop_per_s"):
        self.assertGreater(r[key], 0.0, key)
      self.assertAlmostEqual(r["speedup"], r["upstream_ms"] / r["ours_ms"], places=6)
      # Expert FLOPs: 3 GEGLU matmuls x 2 FLOPs x (1 forward + 2 backward) over E x C x G rows;
      # 64 tokens in 2 groups of 32, C = max(min(32, int(32 * 1.25 / E)), 4).
      capacity = max(min(32, int(32 * 1.25 / experts)), 4)
      rows = experts * capacity * 2
      self.assertAlmostEqual(r["expert_gflop_per_step"], 18 * rows * 16 * 32 / 1e9)
      self.assertAlmostEqual(
          r["ours_efficiency"],
          r["expert_gflop_per_step"] / (r["ours_ms"] / 1e3) / r["matmul_gflop_per_s"], places=6)
      # Same weights and tokens: same output (a real output, not zeros).
      self.assertGreater(r["output_max_abs"], 1e-3)
      self.assertLess(r["max_abs_diff"], 1e-5 * max(1.0, r["output_max_abs"]))

  def test_bad_setting_is_named(self):
    proc = run_tool("--experts=1", *TINY)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--experts=1", proc.stderr)
    self.assertIn(">= 2", proc.stderr)


if __name__ == "__main__":
  absltest.main()
