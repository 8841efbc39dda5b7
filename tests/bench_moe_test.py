"""tools/bench_moe.py (layer benchmark) on one tiny configuration, and tools/bench_model.py's errors.

Checked: the tool runs end to end from another folder; on the same weights and input, our
SparseFFN and upstream mesh_tensorflow MoE1D give the same output; the expert capacity and the
expert FLOPs it reports are the hand-computed ones below. Times are not asserted (a shared 2-core
machine; the performance results live in docs/performance.md).
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d_model=16", "--hidden=32", "--batch_size=2", "--length=32", "--group_size=32",
        "--warmup=1", "--reps=2"]


def run_tool(name, *args):
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                        capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir(),
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


class BenchMoeTest(absltest.TestCase):

  def test_tiny_sweep_runs_and_layers_agree(self):
    proc = run_tool("bench_moe.py", "--experts=2,4", "--json", *TINY)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    self.assertLen(lines, 2, proc.stdout)
    # 2 x 32 tokens in groups of 32: 2 groups. Capacity at cf 1.25, by hand: 2 experts ->
    # int(32 x 1.25 / 2) = 20 slots, 4 experts -> int(40 / 4) = 10; buffer rows E x C x G = 80
    # either way. Expert FLOPs: 3 GEGLU matmuls x 2 FLOPs x (forward + 2 x backward) x rows x M x H
    # = 18 x 80 x 16 x 32.
    for experts, capacity, line in zip((2, 4), (20, 10), lines):
      r = json.loads(line)
      self.assertEqual(r["experts"], experts)
      self.assertEqual(r["expert_capacity"], capacity)
      self.assertAlmostEqual(r["expert_gflop_per_step"], 18 * 80 * 16 * 32 / 1e9)
      for key in ("ours_ms", "upstream_ms", "matmul_gflop_per_s"):
        self.assertGreater(r[key], 0.0, key)
      # Same weights and tokens: same output (a real output, not zeros). Upstream computes its
      # own capacity, so this also holds only if both layers buffer the same tokens.
      self.assertGreater(r["output_max_abs"], 1e-3)
      self.assertLess(r["max_abs_diff"], 1e-5 * max(1.0, r["output_max_abs"]))
      self.assertEqual(r["tokens_over_1pct"], 0.0)

  def test_bfloat16_grid_and_agreement_by_hand(self):
    from st_moe.experiments import bench_layer  # pylint: disable=g-import-not-at-top
    # 1 + 2^-8 lies halfway between the bfloat16 neighbours 1 and 1 + 2^-7: to even, 1.0;
    # 1 + 3 x 2^-8 halfway between 1 + 2^-7 and 1 + 2^-6: to even, 1 + 2^-6. 3.0 is exact.
    got = bench_layer.to_bfloat16_grid([1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.0, -1 - 2 ** -8])
    self.assertEqual(got.tolist(), [1.0, 1 + 2 ** -6, 3.0, -1.0])
    # Three tokens of norm 5 (3, 4): off by 0, by 0.25 (5%) and by 1.0 (20%).
    upstream = [[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]]
    ours = [[3.0, 4.0], [3.0, 4.25], [4.0, 4.0]]
    found = bench_layer.agreement(ours, upstream)
    self.assertEqual(found["max_abs_diff"], 1.0)
    self.assertAlmostEqual(found["tokens_over_1pct"], 2 / 3)
    self.assertAlmostEqual(found["tokens_over_10pct"], 1 / 3)

  def test_bad_setting_is_named(self):
    proc = run_tool("bench_moe.py", "--experts=1", *TINY)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--experts=1: each must be an integer >= 2", proc.stderr)

  def test_model_mode_bad_setting_is_named_before_any_run(self):
    proc = run_tool("bench_moe.py", "--mode=model", "--train_steps=2")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--train_steps=2: must be >= 3", proc.stderr)

  def test_model_mode_runs_the_tables_models_in_alternating_order(self):
    """tools/bench_moe.py --mode=model, flags to output, with only t5_mesh_transformer replaced
    (runner.run stubbed in the tool's process: it records each run and reports a made-up
    throughput): folders, order, the table's gin files and shape, and the ratio, by hand: sparse
    (900 + 1100) / 2 = 1000, dense (1250 + 1250) / 2 = 1250: 0.8."""
    driver = textwrap.dedent("""
        import json, os, runpy, sys
        from st_moe.experiments import runner
        speeds = {"sparse_r0": 900.0, "dense_r0": 1250.0, "dense_r1": 1250.0,
                  "sparse_r1": 1100.0}
        def fake_run(model_dir, gin_files, gin_params=(), **kwargs):
          with open(os.environ["RECORD"], "a") as f:
            f.write(json.dumps([kwargs["label"], model_dir, list(gin_files), list(gin_params),
                                kwargs["tokens_per_step"]]) + "\\n")
          return runner.RunResult(model_dir=model_dir, command=["t5_mesh_transformer"],
                                  returncode=0, steps=[1, 2, 3], losses=[9.0, 8.0, 7.0],
                                  tokens_per_second=speeds[kwargs["label"]])
        runner.run = fake_run
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """)
    with tempfile.TemporaryDirectory() as tmp:
      record = os.path.join(tmp, "runs.jsonl")
      workdir = os.path.join(tmp, "work")
      proc = subprocess.run(
          [sys.executable, "-c", driver, os.path.join(REPO, "tools", "bench_moe.py"),
           "--mode=model", "--scale=small", "--train_steps=5", "--rounds=2", "--json",
           f"--workdir={workdir}"],
          capture_output=True, text=True, timeout=600, cwd=tmp,
          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RECORD=record))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      with open(record) as f:
        seen = [json.loads(line) for line in f]
    labels = ["sparse_r0", "dense_r0", "dense_r1", "sparse_r1"]
    self.assertEqual([s[0] for s in seen], labels)
    self.assertEqual([s[1] for s in seen], [os.path.join(workdir, l) for l in labels])
    self.assertEqual(seen[0][2], ["dataset.gin", "st_moe_small.gin", "cpu.gin",
                                  "reproduce_tiny.gin"])
    self.assertEqual(seen[1][2], ["dataset.gin", "dense_small.gin", "cpu.gin",
                                  "reproduce_tiny.gin"])
    # --scale=small's shape: 32 sequences of 128 + 32 tokens, on the docs corpus.
    self.assertEqual(seen[0][4], 32 * (128 + 32))
    self.assertIn("MIXTURE_NAME = 'st_moe_embedded_docs_span_corruption'", seen[0][3])
    self.assertIn("utils.run.train_steps = 5", seen[0][3])
    r = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    self.assertEqual(r["sparse"], [900.0, 1100.0])
    self.assertEqual(r["dense"], [1250.0, 1250.0])
    self.assertAlmostEqual(r["ratio"], 0.8)

  def test_model_benchmark_bad_setting_is_named_before_any_run(self):
    proc = run_tool("bench_model.py", "--train_steps=0")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--train_steps=0: must be >= 1", proc.stderr)


if __name__ == "__main__":
  absltest.main()
