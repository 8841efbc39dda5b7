"""Tests of st_moe.experiments.runner: progress from event files, the divergence stop, children that
die with their parent, and real CPU runs (router summaries in the event files, evaluation results,
the learning-rate-1000 collapse)."""
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import entry_point
import tensorflow as tf

from st_moe.experiments import divergence
from st_moe.experiments import events
from st_moe.experiments import runner

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ENC = "encoder/block_001/sparse_ffn/SparseFFN/router/"


def write_events(log_dir, rows, name):
  """Writes [(step, wall_time, {tag: value})] as TF2-style tensor summaries into log_dir/name."""
  with tempfile.TemporaryDirectory() as scratch, tf.Graph().as_default():
    writer = tf.compat.v1.summary.FileWriter(scratch)
    for step, wall_time, values in rows:
      summary = tf.compat.v1.Summary()
      for tag, v in values.items():
        summary.value.add(tag=tag).tensor.CopyFrom(tf.make_tensor_proto(v, dtype=tf.float32))
      writer.add_event(tf.compat.v1.Event(wall_time=wall_time, step=step, summary=summary))
    writer.close()
    (written,) = os.listdir(scratch)
    os.replace(os.path.join(scratch, written), os.path.join(log_dir, name))


def router_values(dropped, z_loss=2.0):
  return {ENC + "fraction_dropped": dropped, ENC + "z_loss": z_loss, ENC + "balance_loss": 1.0,
          ENC + "expert_fraction/00": 0.5, ENC + "expert_fraction/01": 0.5}


class ProgressTest(absltest.TestCase):

  def test_steps_losses_router_and_throughput_from_the_event_files(self):
    with tempfile.TemporaryDirectory() as d:
      # Steps 2 and 3 come 40 s and 50 s after step 1: from step 2 on (the first interval holds
      # the executors' start-up), 1 step x 100 tokens in 10 s = 10 tokens/s.
      write_events(d, [(s, t, dict(loss=5.0 - s, **router_values(0.1 * s)))
                       for s, t in ((1, 1000.0), (2, 1040.0), (3, 1050.0))],
                   "events.out.tfevents.2000.host")
      progress = runner.Progress(d, tokens_per_step=100, every=2, label="m", since=1500)
      shown = progress.poll()  # while running, the newest step waits for the next poll
      self.assertEqual(progress.steps, [1, 2])
      shown += progress.poll(final=True)
      self.assertEqual(progress.steps, [1, 2, 3])
      self.assertEqual(progress.losses, [4.0, 3.0, 2.0])
      for got, want in zip(progress.router["dropped"], [0.1, 0.2, 0.3]):  # float32 in the file
        self.assertAlmostEqual(got, want, places=6)
      self.assertLen(progress.router["dropped"], 3)
      self.assertEqual(progress.router["z_loss"], [2.0, 2.0, 2.0])
      self.assertAlmostEqual(progress.tokens_per_second(), 10.0)
      self.assertLen(shown, 2)  # step 1 (first) and step 2 (every=2)
      self.assertIn("step     1  loss  4.0000  router z-loss  2.0000  dropped  10.0%", shown[0])
      self.assertIn("tokens/s", shown[1])

  def test_first_step_and_since_skip_an_earlier_attempt(self):
    with tempfile.TemporaryDirectory() as d:
      write_events(d, [(s, 1000.0 + s, {"loss": 9.0}) for s in (1, 2, 3)],
                   "events.out.tfevents.1000.host")  # the killed attempt, checkpoint at 2
      write_events(d, [(3, 2001.0, {"loss": 3.0}), (4, 2002.0, {"loss": 2.0})],
                   "events.out.tfevents.2000.host")
      progress = runner.Progress(d, tokens_per_step=1, first_step=3, since=2000)
      progress.poll(final=True)
      self.assertEqual((progress.steps, progress.losses), ([3, 4], [3.0, 2.0]))
      self.assertEqual(runner.steps_and_losses(d), ([1, 2, 3, 4], [9.0, 9.0, 3.0, 2.0]))

  def test_monitor_stops_a_collapsed_run(self):
    with tempfile.TemporaryDirectory() as d:
      write_events(d, [(s, 1000.0 + s, dict(loss=5.0 - 0.1 * s, **router_values(0.7)))
                       for s in range(1, 8)], "events.out.tfevents.2000.host")
      progress = runner.Progress(d, tokens_per_step=1, label="m",
                                 monitor=divergence.DivergenceMonitor(collapse_patience=3))
      shown = progress.poll(final=True)
      self.assertEqual(progress.diverged.kind, "collapsed")
      self.assertEqual(progress.diverged.step, 3)
      self.assertEqual(progress.steps, [1, 2, 3])  # nothing after the rule fired
      self.assertTrue(shown[-1].startswith("[m] COLLAPSED: routing collapsed: 70% of the tokens"),
                      shown)

  def test_nan_loss_diverges(self):
    with tempfile.TemporaryDirectory() as d:
      write_events(d, [(1, 1.0, {"loss": 4.0}), (2, 2.0, {"loss": math.nan})],
                   "events.out.tfevents.2000.host")
      progress = runner.Progress(d, tokens_per_step=1, monitor=divergence.DivergenceMonitor())
      progress.poll(final=True)
      self.assertEqual((progress.diverged.kind, progress.diverged.step), ("diverged", 2))
      self.assertTrue(math.isnan(progress.diverged.loss))


class BookkeepingTest(absltest.TestCase):

  def test_latest_checkpoint_step(self):
    with tempfile.TemporaryDirectory() as d:
      self.assertIsNone(runner.latest_checkpoint_step(d))
      with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt-12"\nall_model_checkpoint_paths: "model.ckpt-4"\n')
      self.assertEqual(runner.latest_checkpoint_step(d), 12)

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

  def test_every_command_imports_the_registration(self):
    cmd = runner.command("/m", ["a.gin"], ["x = 1"])
    self.assertEqual(cmd[1:], ["--model_dir=/m", "--module_import=st_moe.register",
                               "--gin_file=a.gin", "--gin_param=x = 1"])
    self.assertNotIn("--module_import=st_moe.register",
                     runner.command("/m", [], module_imports=["st_moe"]))

  def test_eval_results_of_one_attempt_from_its_log(self):
    with tempfile.TemporaryDirectory() as d:
      ev = os.path.join(d, "eval_validation_8")
      os.makedirs(ev)
      os.makedirs(os.path.join(d, "logs"))
      write_events(ev, [(6, 1.0, {"neg_log_perplexity": -5.0})], "events.out.tfevents.1000.h")
      write_events(ev, [(6, 2.0, {"neg_log_perplexity": -4.0})], "events.out.tfevents.3000.h")
      log = os.path.join(d, "logs", "eval.0.log")
      with open(log, "w") as f:
        f.write(f"t5_mesh_transformer ...\n{runner.STARTED_TAG}2999.5\n")
      self.assertEqual(runner.eval_results(d), [(6, {"neg_log_perplexity": -4.0})])
      self.assertEqual(runner.eval_results(log), [(6, {"neg_log_perplexity": -4.0})])
      self.assertEqual(runner.eval_results(d, since=3500), [])
      with open(log, "w") as f:
        f.write("something else\n")
      with self.assertRaisesRegex(ValueError, "not a log of st_moe.experiments.runner"):
        runner.eval_results(log)


def _children(pid):
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(c) for c in f.read().split()]


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(") ")[1][0] != "Z"  # a zombie is dead, waiting to be reaped
  except FileNotFoundError:
    return False


class ChildDiesWithParentTest(absltest.TestCase):

  def kill_parent_and_check_child(self, sig):
    with tempfile.TemporaryDirectory() as d:
      parent = subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "runner_parent.py"), d])
      deadline = time.monotonic() + 120
      children = []
      while not children and time.monotonic() < deadline:
        time.sleep(0.2)
        children = _children(parent.pid)
      self.assertLen(children, 1)
      (child,) = children
      self.assertTrue(_alive(child))
      time.sleep(1.0)  # the child is past its preexec_fn
      os.kill(parent.pid, sig)
      parent.wait(60)
      deadline = time.monotonic() + 30
      while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
      self.assertFalse(_alive(child), f"child {child} survived its parent's {sig!r}")

  def test_sigkill(self):
    self.kill_parent_and_check_child(signal.SIGKILL)

  def test_sigterm(self):
    self.kill_parent_and_check_child(signal.SIGTERM)

  def test_sigint(self):
    self.kill_parent_and_check_child(signal.SIGINT)


TINY = ["dataset.gin", "st_moe_tiny.gin", "cpu.gin"]
TINY_PARAMS = ["MIXTURE_NAME = 'st_moe_test_bytes_span_corruption'",
               "utils.run.batch_size = ('sequences_per_batch', 4)",
               "utils.run.sequence_length = {'inputs': 64, 'targets': 16}",
               *entry_point.ONE_LAYER]


class RealRunTest(absltest.TestCase):

  def test_router_summaries_reach_the_event_files_on_cpu_and_evaluation(self):
    with tempfile.TemporaryDirectory() as d:
      env = dict(os.environ, PYTHONPATH=TESTS_DIR)
      shown = []
      result = runner.run(
          d, TINY, TINY_PARAMS + ["utils.run.train_steps = 3",
                                  "utils.run.save_checkpoints_steps = 3",
                                  "utils.run.iterations_per_loop = 3"],
          tokens_per_step=4 * 80, label="tiny", every=2, module_imports=("testing_tasks",),
          env=env, show=shown.append, timeout=1200, monitor=divergence.DivergenceMonitor())
      with open(result.log_path) as f:
        log = f.read()
      self.assertEqual(result.returncode, 0, log[-3000:])
      self.assertTrue(result.ok)
      self.assertEqual(result.steps, [1, 2, 3])
      # mesh_tensorflow's own print of the loss (CPU only) agrees with the event files.
      printed = [float(v) for v in re.findall(r"step, tf_loss\[([^\]]+)\]", log)]
      self.assertEqual(len(printed), 3)
      for a, b in zip(printed, result.losses):
        self.assertAlmostEqual(a, b, places=5)
      self.assertLen(result.router["dropped"], 3)
      self.assertTrue(any("step     2" in s and "router z-loss" in s for s in shown), shown)
      self.assertGreater(result.tokens_per_second, 0)
      reader = events.EventReader(d)
      reader.poll()
      layers = events.router_layers(reader.scalars)
      # st_moe_tiny with 1 + 1 layers: the one layer of each stack is sparse (block 000).
      self.assertEqual(sorted(layers), [f"{s}/block_000/sparse_ffn/SparseFFN"
                                        for s in ("decoder", "encoder")])
      for scope, metrics in layers.items():
        fractions = sorted(k for k in metrics if k.startswith("expert_fraction/"))
        self.assertEqual(fractions, [f"expert_fraction/0{e}" for e in range(4)])
        for step in (1, 2, 3):
          self.assertAlmostEqual(sum(metrics[k][step] for k in fractions), 1.0, places=5)
          self.assertBetween(metrics["fraction_dropped"][step], 0.0, 1.0)
          # z-loss = mean (log sum exp logits)^2 >= (log 4 - small)^2 for a near-uniform router.
          self.assertGreater(metrics["z_loss"][step], 1.5, scope)
          self.assertBetween(metrics["entropy"][step], 0.0, math.log(4) + 1e-6)
          # Every token's log-sum-exp lies in [max logit, max logit + ln 4], so the z-loss (their
          # mean square, all positive here) is at most (largest logit + ln 4)^2.
          self.assertLessEqual(metrics["z_loss"][step],
                               (metrics["max_logit"][step] + math.log(4)) ** 2 + 1e-4, scope)

      # Evaluation: the router's means over the evaluation batches, beside the perplexity.
      ev = runner.run(
          d, TINY + ["perplexity_eval.gin"],
          TINY_PARAMS + ["utils.run.dataset_split = 'validation'",
                         "utils.run.eval_checkpoint_step = 3",
                         "utils.run.perplexity_eval_steps = 1"],
          tokens_per_step=1, label="eval", module_imports=("testing_tasks",), env=env,
          show=shown.append, timeout=1200)
      self.assertEqual(ev.returncode, 0, open(ev.log_path).read()[-3000:])
      found = runner.eval_results(d, since=ev.started)
      self.assertLen(found, 1)
      step, metrics = found[0]
      self.assertEqual(step, 3)
      self.assertLess(metrics["neg_log_perplexity"], 0.0)
      router = events.summarise_router_metrics(metrics)
      self.assertBetween(router["fraction_dropped"], 0.0, 1.0)
      self.assertGreater(router["z_loss"], 1.5)
      self.assertEqual(runner.eval_results(ev.log_path), found)

  def test_learning_rate_1000_is_stopped_and_named(self):
    # The case of the issue "No silent failure", with the demo's task and shape: at a learning
    # rate of 1000 the tiny ST-MoE froze (the same loss from step 3 on, 67% of the tokens
    # dropped, every token to one expert) and passed as "ok". Measured here with 2 + 2 layers
    # (2026-12-05): 7.0205, 9.0e7, then 6.9922 at every step from step 3, 67.1% dropped; stopped
    # as FROZEN at step 8 (with 4 + 4: 7.0695, 1.9e8, then 7.0142; the same stop).
    # (At batch 4 x (64 + 16) on the byte task the same learning rate gives a NaN at step 4,
    # which the NaN rule names "diverged".)
    with tempfile.TemporaryDirectory() as d:
      shown = []
      result = runner.run(
          d, TINY, ["MIXTURE_NAME = 'st_moe_embedded_span_corruption'",
                    "utils.run.batch_size = ('sequences_per_batch', 16)",
                    "utils.run.sequence_length = {'inputs': 128, 'targets': 32}",
                    "utils.run.train_steps = 60", "utils.run.save_checkpoints_steps = 60",
                    "utils.run.iterations_per_loop = 60",
                    "utils.run.learning_rate_schedule = "
                    "@learning_rate_schedules.constant_learning_rate",
                    "learning_rate_schedules.constant_learning_rate.learning_rate = 1000.0",
                    *entry_point.TWO_LAYERS],
          tokens_per_step=16 * 160, label="lr1000", every=1, show=shown.append, timeout=1800,
          monitor=divergence.DivergenceMonitor())
      print("\n".join(shown))
      self.assertFalse(result.ok)
      self.assertIsNotNone(result.diverged, "\n".join(shown))
      self.assertIn(result.diverged.kind, ("frozen", "collapsed"), result.diverged.reason)
      self.assertLess(result.diverged.step, 30)  # stopped early, not trained to step 60
      self.assertNotEqual(runner.latest_checkpoint_step(d), 60)
      self.assertTrue(any(line.startswith("[lr1000] FROZEN: ")
                          or line.startswith("[lr1000] COLLAPSED: ") for line in shown), shown)

if __name__ == "__main__":
  absltest.main()
