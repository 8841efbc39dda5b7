"""End-to-end: a short `make demo` (tools/demo.py) killed by its PID and rerun: pretraining,
evaluation, routing trace, fine-tuning and decoding, report; and a third run that skips it all.
(A demo whose model diverges: tests/demo_diverged_test.py, so the two files run side by side.)

One demo run is shared by the tests of DemoTest: 8 steps of st_moe_tiny and dense_tiny (1 + 1
layers each, entry_point.ONE_LAYER) through t5_mesh_transformer, checkpoints every 2 steps,
evaluation, routing trace, 2 fine-tuning steps each, decoding, report. It is first killed by its
PID (SIGTERM) once st_moe_tiny has its checkpoint at step 2, then rerun: the rerun resumes
st_moe_tiny from that checkpoint and does the rest, so the finished demo's curve of 1..8 is also
the killed-and-resumed curve.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import entry_point
import numpy as np

from st_moe.experiments import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = {"inputs": 64, "targets": 16}
# 8 steps with a checkpoint every 2: the demo is killed once the first (step 2) is written, with
# 6 steps (seconds) still to go, so that the kill lands mid-training.
STEPS, EVERY = 8, 2
KILL_ATTEMPTS = 3  # kills that land after the last training step are retried (setUpClass)
TRACE_TOKENS, TRACE_BATCH = 128, 8  # the tracer's default batch: 8 sequences
# st_moe_tiny has 4 experts and routing groups of S = 64 tokens. At eval capacity factor 4 an
# expert holds min(S, int(S * 4 / 4)) = S slots per group: every token of a group fits in every
# expert (a token sends at most one choice to an expert), so nothing can be dropped. At the default
# 2.0 it holds S / 2 and an untrained router overflows some.
CF_EVAL = 4.0
# Adafactor steps are relative to each weight's scale: at 1e30 the first update scales every
# weight by ~1e30, and the next forward pass overflows float32 (NaN loss).
DIVERGING = ["utils.run.learning_rate_schedule = @learning_rate_schedules.constant_learning_rate",
             "learning_rate_schedules.constant_learning_rate.learning_rate = 1e30"]


FINETUNE_STEPS = 2


def demo_cmd(out, models=("st_moe_tiny", "dense_tiny"), gin_params=(), finetune=False):
  # The fine-tuning stage (embedded downstream task, decoding) only in the shared whole run.
  finetune_flags = ([f"--finetune_steps={FINETUNE_STEPS}", "--finetune_batch_size=4"] if finetune
                    else ["--finetune_task="])
  return ([sys.executable, os.path.join(REPO, "tools", "demo.py"), f"--out={out}",
           f"--train_steps={STEPS}", f"--checkpoint_every={EVERY}", "--eval_steps=1",
           "--batch_size=4", f"--inputs_length={LENGTHS['inputs']}",
           f"--targets_length={LENGTHS['targets']}", f"--trace_tokens={TRACE_TOKENS}",
           f"--capacity_factor_eval={CF_EVAL}", f"--models={','.join(models)}"]
          + finetune_flags
          + [f"--gin_param={p}" for p in (*entry_point.ONE_LAYER, *gin_params)])


def run_demo(out, **kwargs):
  return subprocess.run(demo_cmd(out, **kwargs), capture_output=True, text=True, timeout=2400)


def processes_naming(text):
  """PIDs of this machine's processes whose command line contains `text`."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
      continue
    if text in cmdline:
      found.append(int(pid))
  return found


def kill_after_first_checkpoint(out, **kwargs):
  """Starts the demo, kills it by its PID (SIGTERM) once st_moe_tiny has its first checkpoint;
  returns (the PIDs of training processes that outlived it, killed now; the demo's log)."""
  model_dir = os.path.join(out, "st_moe_tiny")
  os.makedirs(out, exist_ok=True)
  log_path = os.path.join(out, "killed.log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(demo_cmd(out, **kwargs), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1200
    while (not os.path.exists(os.path.join(model_dir, f"model.ckpt-{EVERY}.index"))
           and proc.poll() is None and time.monotonic() < deadline):
      time.sleep(0.2)
    ended_early = proc.poll() is not None
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
  time.sleep(3)
  survivors = processes_naming(f"--model_dir={model_dir}")
  for pid in survivors:  # leave nothing running, whatever the outcome
    os.kill(pid, signal.SIGKILL)
  with open(log_path) as f:
    log = f.read()
  if ended_early:
    log = "the demo ended before its first checkpoint\n" + log
  return survivors, log


def _log(proc):
  return proc.stdout[-4000:] + proc.stderr[-4000:]


class DemoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.out = os.path.join(cls.tmp.name, "whole")
    # The kill races the 6 steps after the first checkpoint (about a second and a half here): on a
    # loaded machine it can land after st_moe_tiny's last step, and the rerun then has nothing to
    # resume (seen once, 2026-12-06, with other work running beside `make test`). That tests
    # nothing, so it is retried in a clean folder, up to KILL_ATTEMPTS kills in all; survivors are
    # checked after every kill.
    cls.survivors, cls.kill_attempts = [], 0
    while True:
      survivors, cls.killed_log = kill_after_first_checkpoint(cls.out, finetune=True)
      cls.survivors += survivors
      cls.kill_attempts += 1
      # What the rerun decides "nothing left to train" by (jobs.train).
      reached = runner.latest_checkpoint_step(os.path.join(cls.out, "st_moe_tiny")) or 0
      if reached < STEPS or cls.kill_attempts == KILL_ATTEMPTS:
        break
      shutil.rmtree(cls.out)
    cls.proc = run_demo(cls.out, finetune=True)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.assertEqual(self.proc.returncode, 0, _log(self.proc))

  def test_demo_writes_report_checkpoints_and_pngs(self):
    with open(os.path.join(self.out, "report.md")) as f:
      report = f.read()
    for needle in ("st_moe_tiny", "dense_tiny", "validation neg. log perplexity",
                   "router entropy", "![loss curves](loss_curves.png)", "](routing/",
                   "python -m st_moe.experiments.jobs"):
      self.assertIn(needle, report)
    self.assertNotIn("tools/", report)  # no tool run by path
    pngs = [os.path.join(self.out, "loss_curves.png")] + [
        os.path.join(self.out, "routing", f) for f in os.listdir(os.path.join(self.out, "routing"))
        if f.endswith(".png")]
    self.assertGreaterEqual(len(pngs), 1 + 2 + 1)  # curves, one heat map per sparse layer, entropy
    for path in pngs:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), PNG_MAGIC, path)
    for model in ("st_moe_tiny", "dense_tiny"):
      model_dir = os.path.join(self.out, model)
      self.assertTrue(os.path.exists(os.path.join(model_dir, "operative_config.gin")))
      for step in range(EVERY, STEPS + 1, EVERY):  # a checkpoint every 2 steps
        self.assertTrue(os.path.exists(os.path.join(model_dir, f"model.ckpt-{step}.index")),
                        (model, step, sorted(os.listdir(model_dir))))
      self.assertEqual(runner.steps_and_losses(model_dir)[0], list(range(1, STEPS + 1)))
      with open(os.path.join(model_dir, "eval.json")) as f:
        ev = json.load(f)
      self.assertEqual(ev["step"], STEPS)
      self.assertIn(f"st_moe.SparseFFN.capacity_factor_eval = {CF_EVAL}", ev["gin_params"])
      self.assertTrue(math.isfinite(ev["neg_log_perplexity"]))
      self.assertLess(ev["neg_log_perplexity"], 0)
    self.assertRegex(self.proc.stdout, rf"\[st_moe_tiny\] step +{STEPS} +loss +\d")
    self.assertIn("tokens/s", self.proc.stdout)

  def test_killed_demo_left_nothing_running_and_resumed_from_its_checkpoint(self):
    self.assertNotIn("the demo ended before its first checkpoint", self.killed_log[:60])
    self.assertEqual(self.survivors, [], "t5_mesh_transformer outlived the demo killed by its PID")
    # Resumed from a checkpoint the killed run wrote (step 2, or a later one if the kill landed
    # late), not from scratch and not after the end.
    resumed = re.search(rf"\[st_moe_tiny\] training steps (\d+)\.\.{STEPS} \(resuming from its "
                        r"checkpoint\)", self.proc.stdout)
    self.assertIsNotNone(resumed, f"{self.kill_attempts} kill(s), the last one's rerun:\n"
                         + self.proc.stdout[:2000])
    self.assertBetween(int(resumed.group(1)), EVERY + 1, STEPS - 1)
    # One loss per step 1..STEPS in the event files (checked in
    # test_demo_writes_report_checkpoints_and_pngs), all finite.
    _, losses = runner.steps_and_losses(os.path.join(self.out, "st_moe_tiny"))
    self.assertTrue(all(math.isfinite(v) for v in losses), losses)

  def test_progress_shows_router_metrics(self):
    # From the sparse layers' summaries in the event files (no print_metrics).
    self.assertRegex(self.proc.stdout, r"\[st_moe_tiny\] step +\d+ +loss .* router z-loss")

  def test_finetunes_and_decodes_each_model(self):
    with open(os.path.join(self.out, "report.md")) as f:
      report = f.read()
    self.assertIn("## Fine-tuning and decoding", report)
    self.assertIn("![fine-tuning loss](finetune_curves.png)", report)
    with open(os.path.join(self.out, "finetune_curves.png"), "rb") as f:
      self.assertEqual(f.read(8), PNG_MAGIC)
    task = "st_moe_embedded_pydoc_topic"
    for model in ("st_moe_tiny", "dense_tiny"):
      model_dir = os.path.join(self.out, f"{model}_finetune")
      # Fine-tuning counts on from the pretrained checkpoint (step STEPS) for FINETUNE_STEPS steps.
      final = STEPS + FINETUNE_STEPS
      self.assertTrue(os.path.exists(os.path.join(model_dir, f"model.ckpt-{final}.index")),
                      sorted(os.listdir(model_dir)))
      with open(os.path.join(model_dir, "decode.json")) as f:
        decoded = json.load(f)
      self.assertEqual(decoded["step"], final)
      # The accuracy the run reports is the exact-match rate of what it wrote (72 validation
      # passages), recomputed here from its predictions and targets files.
      eval_dir = os.path.join(model_dir, "validation_eval")
      predictions = entry_point.read_eval_lines(
          os.path.join(eval_dir, f"{task}_{final}_predictions"))
      targets = entry_point.read_eval_lines(os.path.join(eval_dir, f"{task}_targets"))
      self.assertLen(targets, 72)
      self.assertLen(predictions, 72)
      exact = 100.0 * np.mean([p == t for p, t in zip(predictions, targets)])
      self.assertAlmostEqual(decoded["accuracy"], exact, places=3)
      self.assertIn(f"| {model} |", report.split("## Fine-tuning and decoding")[1])

  def test_rerun_skips_finished_work(self):
    proc = run_demo(self.out, finetune=True)
    self.assertEqual(proc.returncode, 0, _log(proc))
    self.assertIn("[st_moe_tiny] already trained", proc.stdout)
    self.assertIn("[dense_tiny] already trained", proc.stdout)
    self.assertNotIn("evaluating", proc.stdout)
    self.assertNotIn("tracing", proc.stdout)
    # The killed run's log and the resumed run's; nothing new from this rerun.
    self.assertEqual(sorted(os.listdir(os.path.join(self.out, "st_moe_tiny", "logs"))),
                     ["eval.0.log", "st_moe_tiny.0.log", "st_moe_tiny.1.log"])

  def test_trace_at_the_eval_capacity_factor(self):
    with open(os.path.join(self.out, "routing", "routing.json")) as f:
      layers = json.load(f)
    self.assertLen(layers, 2)  # 1 + 1 layers: 1 sparse layer in each of encoder and decoder
    self.assertEqual([l["stack"] for l in layers], ["encoder", "decoder"])
    for layer in layers:
      e = layer["num_experts"]
      self.assertEqual(e, 4)
      self.assertBetween(layer["router_entropy"], 0.0, math.log(e) + 1e-6)
      self.assertBetween(layer["load_entropy"], 0.0, math.log(e) + 1e-6)
      self.assertEqual(layer["fraction_dropped"], 0.0, layer["name"])  # see CF_EVAL
      self.assertEqual(int(np.asarray(layer["class_counts"]).sum()), layer["num_tokens"])
    enc, dec = layers[0]["num_tokens"], layers[1]["num_tokens"]
    # At least --trace_tokens encoder tokens, in whole batches: less than one batch more.
    self.assertGreaterEqual(enc, TRACE_TOKENS)
    self.assertLess(enc, TRACE_TOKENS + TRACE_BATCH * LENGTHS["inputs"])
    self.assertGreater(dec, 0)


if __name__ == "__main__":
  absltest.main()
