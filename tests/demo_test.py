"""End-to-end: a short `make demo` (tools/demo.py) and the routing tracer on the model it trained.

One demo run (a few steps of st_moe_tiny and dense_tiny through t5_mesh_transformer, evaluation,
routing trace, report) is shared by the tests below; it takes about two minutes on the CPU.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = {"inputs": 64, "targets": 16}


def run_demo(out, steps):
  cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), f"--out={out}",
         f"--train_steps={steps}", f"--checkpoint_every={steps}", "--eval_steps=1",
         "--batch_size=4", f"--inputs_length={LENGTHS['inputs']}",
         f"--targets_length={LENGTHS['targets']}", "--trace_tokens=128"]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


class DemoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.out = cls.tmp.name
    cls.proc = run_demo(cls.out, steps=4)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_demo_writes_report_checkpoints_and_pngs(self):
    self.assertEqual(self.proc.returncode, 0, self.proc.stdout[-3000:] + self.proc.stderr[-5000:])
    with open(os.path.join(self.out, "report.md")) as f:
      report = f.read()
    for needle in ("st_moe_tiny", "dense_tiny", "validation neg. log perplexity",
                   "router entropy", "![loss curves](loss_curves.png)"):
      self.assertIn(needle, report)
    pngs = [os.path.join(self.out, "loss_curves.png")] + [
        os.path.join(self.out, "routing", f) for f in os.listdir(os.path.join(self.out, "routing"))
        if f.endswith(".png")]
    self.assertGreaterEqual(len(pngs), 1 + 4 + 1)  # curves, one heat map per sparse layer, entropy
    for path in pngs:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), PNG_MAGIC, path)
    for model in ("st_moe_tiny", "dense_tiny"):
      model_dir = os.path.join(self.out, model)
      self.assertTrue(os.path.exists(os.path.join(model_dir, "operative_config.gin")))
      with open(os.path.join(model_dir, "eval.json")) as f:
        ev = json.load(f)
      self.assertEqual(ev["step"], 4)
      self.assertTrue(math.isfinite(ev["neg_log_perplexity"]))
      self.assertLess(ev["neg_log_perplexity"], 0)
    # Progress shows steps, loss, router metrics and throughput.
    self.assertRegex(self.proc.stdout, r"\[st_moe_tiny\] step +4 +loss +\d")
    self.assertIn("router z-loss", self.proc.stdout)
    self.assertIn("tokens/s", self.proc.stdout)

  def test_rerun_skips_finished_work(self):
    # Resuming an interrupted training from its checkpoint is t5_mesh_transformer's (tested in
    # train_entrypoint_test); the demo must not redo finished steps: no new training, no new eval.
    self.assertEqual(self.proc.returncode, 0)
    proc = run_demo(self.out, steps=4)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-5000:])
    self.assertIn("[st_moe_tiny] already trained to step 4", proc.stdout)
    self.assertIn("[dense_tiny] already trained to step 4", proc.stdout)
    self.assertNotIn("evaluating", proc.stdout)
    self.assertNotIn("[trace]", proc.stdout)
    self.assertEqual(sorted(os.listdir(os.path.join(self.out, "st_moe_tiny", "logs"))),
                     ["eval.0.log", "st_moe_tiny.0.log"])

  def test_trace_matches_layer_metrics_and_bounds(self):
    self.assertEqual(self.proc.returncode, 0)
    with open(os.path.join(self.out, "routing", "routing.json")) as f:
      layers = json.load(f)
    self.assertLen(layers, 4)  # st_moe_tiny: 2 sparse layers in each of encoder and decoder
    self.assertEqual([l["stack"] for l in layers], ["encoder"] * 2 + ["decoder"] * 2)
    for layer in layers:
      e = layer["num_experts"]
      self.assertBetween(layer["router_entropy"], 0.0, math.log(e) + 1e-6)
      self.assertBetween(layer["load_entropy"], 0.0, math.log(e) + 1e-6)
      self.assertAlmostEqual(layer["uniform_entropy"], math.log(e))
      shares = np.asarray(layer["class_shares"])
      counts = np.asarray(layer["class_counts"])
      busy = counts.sum(axis=1) > 0
      np.testing.assert_allclose(shares[busy].sum(axis=1), 1.0, atol=1e-9)
      self.assertEqual(int(counts.sum()), layer["num_tokens"])
      self.assertAlmostEqual(sum(layer["expert_load"]), 1.0, places=9)
      # The tracer's own count of dropped tokens equals the layer's summary on the same batches.
      self.assertAlmostEqual(layer["fraction_dropped"],
                             layer["layer_metrics"]["fraction_dropped"], places=5)
      self.assertAlmostEqual(layer["router_entropy"], layer["layer_metrics"]["entropy"], places=4)
    # Token counts match the input: every non-padding encoder token of the traced batches.
    enc = layers[0]["num_tokens"]
    self.assertGreaterEqual(enc, 128)
    self.assertEqual(enc, layers[1]["num_tokens"])
    self.assertLessEqual(enc % LENGTHS["inputs"], enc)


if __name__ == "__main__":
  absltest.main()
