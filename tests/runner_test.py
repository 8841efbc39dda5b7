"""Tests of st_moe.experiments.runner: output parsing, progress, divergence stop, and a real CPU run."""
import math
import os
import tempfile

from absl.testing import absltest

from st_moe.experiments import divergence
from st_moe.experiments import runner

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


class FakeClock:

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    self.t += 0.5
    return self.t


class ProgressParserTest(absltest.TestCase):

  def test_parses_steps_router_metrics_and_throughput(self):
    p = runner.ProgressParser(tokens_per_step=100, every=2, label="m", clock=FakeClock())
    shown = []
    for line in ["noise", "st_moe_router[enc/0][0.5][0.1]", "st_moe_router[dec/0][1.5][0.3]",
                 "step, tf_loss[4.5][1]", "step, tf_loss[4.0][2]", "I1128 other",
                 "step, tf_loss[3.5][3]"]:
      out = p.feed(line)
      if out:
        shown.append(out)
    self.assertEqual(p.steps, [1, 2, 3])
    self.assertEqual(p.losses, [4.5, 4.0, 3.5])
    self.assertEqual(p.router["z_loss"], [1.0])
    self.assertAlmostEqual(p.router["dropped"][0], 0.2)
    # 2 steps of 100 tokens in 1.0 s of the fake clock (0.5 s per call).
    self.assertAlmostEqual(p.tokens_per_second(), 200.0)
    self.assertLen(shown, 2)  # step 1 (first) and step 2 (every=2)
    self.assertIn("step     1", shown[0])
    self.assertIn("router z-loss", shown[0])
    self.assertIn("tokens/s", shown[1])

  def test_steps_count_lines_after_the_first_printed_step(self):
    # mesh_tensorflow's print can show "[101]" twice around a loop boundary and skip 100.
    p = runner.ProgressParser(tokens_per_step=1, label="m")
    for line in ["step, tf_loss[4.0][98]", "step, tf_loss[3.9][99]", "step, tf_loss[3.8][101]",
                 "step, tf_loss[3.7][101]"]:
      p.feed(line)
    self.assertEqual(p.steps, [98, 99, 100, 101])

  def test_first_step_given_overrides_the_racy_print(self):
    # The first print may show the global step before its increment ("[0]" on a fresh run).
    p = runner.ProgressParser(tokens_per_step=1, label="m", first_step=1)
    for line in ["step, tf_loss[4.0][0]", "step, tf_loss[3.9][2]", "step, tf_loss[3.8][2]"]:
      p.feed(line)
    self.assertEqual(p.steps, [1, 2, 3])

  def test_divergence_is_reported_once_seen(self):
    p = runner.ProgressParser(100, monitor=divergence.DivergenceMonitor(), label="m")
    p.feed("step, tf_loss[4.0][1]")
    out = p.feed("step, tf_loss[nan][2]")
    self.assertIn("DIVERGED", out)
    self.assertEqual(p.diverged.step, 2)
    self.assertTrue(math.isnan(p.diverged.loss))

  def test_latest_checkpoint_step(self):
    with tempfile.TemporaryDirectory() as d:
      self.assertIsNone(runner.latest_checkpoint_step(d))
      with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt-12"\nall_model_checkpoint_paths: "model.ckpt-4"\n')
      self.assertEqual(runner.latest_checkpoint_step(d), 12)

  def test_parse_eval_line(self):
    line = ("I1128 estimator.py:2083] Saving dict for global step 20: global_step = 20, "
            "loss = 3.6946387, neg_log_perplexity = -4.076843, num_eval_tokens = 1160.0")
    step, metrics = runner.parse_eval_line(line)
    self.assertEqual(step, 20)
    self.assertAlmostEqual(metrics["neg_log_perplexity"], -4.076843)
    self.assertEqual(metrics["num_eval_tokens"], 1160.0)
    self.assertIsNone(runner.parse_eval_line("step, tf_loss[4.0][1]"))

  def test_steps_and_losses_merge_attempts_later_wins(self):
    with tempfile.TemporaryDirectory() as d:
      os.makedirs(os.path.join(d, "logs"))
      for n, lines in enumerate([["step, tf_loss[5.0][1]", "step, tf_loss[4.0][2]"],
                                 ["step, tf_loss[3.9][2]", "step, tf_loss[3.0][3]"]]):
        with open(os.path.join(d, "logs", f"train.{n}.log"), "w") as f:
          f.write("\n".join(lines) + "\n")
      self.assertEqual(runner.steps_and_losses(d), ([1, 2, 3], [5.0, 3.9, 3.0]))
      # A log that records its first step wins over the step its first line prints.
      with open(os.path.join(d, "logs", "train.2.log"), "w") as f:
        f.write("cmd\n" + runner.FIRST_STEP_TAG + "4\nstep, tf_loss[2.5][3]\nstep, tf_loss[2.0][5]\n")
      self.assertEqual(runner.steps_and_losses(d), ([1, 2, 3, 4, 5], [5.0, 3.9, 3.0, 2.5, 2.0]))

  def test_json_bookkeeping_round_trips_and_leaves_no_temporary_file(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "run", "train_done.json")
      self.assertIsNone(runner.read_json(path))
      runner.write_json(path, {"train_steps": 400, "diverged": None})
      runner.write_json(path, {"train_steps": 800, "diverged": None})  # replaced whole
      self.assertEqual(runner.read_json(path), {"train_steps": 800, "diverged": None})
      self.assertEqual(os.listdir(os.path.dirname(path)), ["train_done.json"])

  def test_tokens_per_step(self):
    self.assertEqual(runner.tokens_per_step(8, {"inputs": 64, "targets": 16}), 640)


class RealRunTest(absltest.TestCase):

  def test_trains_through_t5_mesh_transformer_and_reports_progress(self):
    with tempfile.TemporaryDirectory() as d:
      env = dict(os.environ, PYTHONPATH=TESTS_DIR)
      shown = []
      result = runner.run(
          d, ["dataset.gin", "models/t5.1.1.tiny.gin", "objectives/span_3_15_u_u.gin"],
          ["MIXTURE_NAME='st_moe_test_bytes_span_corruption'",
           "utils.run.train_steps=6", "utils.run.batch_size=('sequences_per_batch', 4)",
           "utils.run.sequence_length={'inputs': 64, 'targets': 16}",
           "utils.run.mesh_shape=''", "utils.run.layout_rules=''",
           "utils.run.save_checkpoints_steps=6", "utils.run.iterations_per_loop=6",
           "d_model=32", "d_ff=64", "num_heads=2", "d_kv=16",
           "encoder/make_layer_stack.num_layers=1", "decoder/make_layer_stack.num_layers=1"],
          tokens_per_step=4 * 80, label="tiny", every=3, module_imports=("testing_tasks",),
          env=env, show=shown.append, timeout=400)
      self.assertEqual(result.returncode, 0, open(result.log_path).read()[-3000:])
      self.assertTrue(result.ok)
      self.assertEqual(result.steps, [1, 2, 3, 4, 5, 6])
      self.assertTrue(all(math.isfinite(l) for l in result.losses))
      self.assertEqual(runner.latest_checkpoint_step(d), 6)
      self.assertTrue(os.path.exists(os.path.join(d, "operative_config.gin")))
      self.assertTrue(any("step     3" in s for s in shown), shown)
      self.assertGreater(result.tokens_per_second, 0)
      with open(result.log_path) as f:
        self.assertIn("t5_mesh_transformer", f.readline())


if __name__ == "__main__":
  absltest.main()
