"""st_moe.experiments.jobs without training: bookkeeping, skipping, settings, side-by-side runs.

The end-to-end paths (training, resuming, evaluating, tracing) run in demo_test and reproduce_test.
"""
import os
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

from absl.testing import absltest

import checkpoint_files
from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments.tables import common
from st_moe.experiments.tables import stability


def _job(model_dir, params=("num_experts = 4",)):
  return jobs.Job(name="j", model_dir=model_dir, gin_files=["st_moe_tiny.gin", "cpu.gin"],
                  gin_params=list(params), task="some_task", shape=jobs.Shape(4, 32, 8))


def _no_run(*args, **kwargs):
  raise AssertionError(f"runner.run called: {args} {kwargs}")


class ShapeTest(absltest.TestCase):

  def test_bindings_and_tokens(self):
    shape = jobs.Shape(batch_size=4, inputs_length=32, targets_length=8)
    self.assertEqual(shape.tokens_per_step(), 4 * (32 + 8))  # 160 tokens, padding included
    self.assertEqual(shape.gin_params(),
                     ["utils.run.batch_size = ('sequences_per_batch', 4)",
                      "utils.run.sequence_length = {'inputs': 32, 'targets': 8}"])

  def test_bad_shape_is_named(self):
    with self.assertRaisesRegex(ValueError, r"--inputs_length=1: must be an integer >= 2"):
      jobs.Shape(4, 1, 8).validate()
    with self.assertRaisesRegex(ValueError, r"--batch_size=0: must be an integer >= 1"):
      jobs.Shape(0, 32, 8).validate()


class BookkeepingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp(prefix="jobs_test_")

  def test_json_round_trip_leaves_no_temporary_file(self):
    path = os.path.join(self.dir, "a", "b.json")
    jobs.write_json(path, {"x": [1, 2.5, None]})
    self.assertEqual(jobs.read_json(path), {"x": [1, 2.5, None]})
    self.assertEqual(os.listdir(os.path.dirname(path)), ["b.json"])
    self.assertIsNone(jobs.read_json(os.path.join(self.dir, "missing.json")))

  def test_finished_and_diverged_runs_are_skipped_without_running(self):
    lines = []
    job = _job(os.path.join(self.dir, "done"))
    jobs.write_json(job.path("train_done.json"), {"train_steps": 6, "status": "done"})
    with mock.patch.object(runner, "run", _no_run):
      self.assertEqual(jobs.train(job, 6, 2, show=lines.append)["status"], "done")
    self.assertEqual(lines, [f"[j] already trained (delete {job.path('train_done.json')} to "
                             "rerun)"])
    job = _job(os.path.join(self.dir, "div"))
    jobs.write_json(job.path("diverged.json"), {"train_steps": 6, "status": "diverged",
                                                "diverged": "loss is nan at step 3"})
    lines = []
    with mock.patch.object(runner, "run", _no_run):
      summary = jobs.train(job, 6, 2, show=lines.append)
    self.assertTrue(jobs.failed(summary))
    self.assertIn("already diverged", lines[0])
    self.assertIn("loss is nan at step 3", lines[0])

  def test_a_folder_of_another_run_is_refused_before_running(self):
    model_dir = os.path.join(self.dir, "other")
    jobs.write_json(os.path.join(model_dir, "job.json"),
                    _job(model_dir, params=["num_experts = 8"]).settings())
    with mock.patch.object(runner, "run", _no_run):
      with self.assertRaisesRegex(ValueError, r"holds a run with other gin_params "
                                  r"\(-num_experts = 8; \+num_experts = 4\)"):
        jobs.train(_job(model_dir), 6, 2, show=lambda line: None)

  def test_checkpoint_at_the_last_step_counts_as_trained(self):
    # Killed after its last checkpoint but before its bookkeeping: nothing is run again.
    job = _job(os.path.join(self.dir, "ckpt"))
    os.makedirs(job.model_dir)
    with open(job.path("checkpoint"), "w") as f:
      f.write('model_checkpoint_path: "model.ckpt-6"\n')
    lines = []
    with mock.patch.object(runner, "run", _no_run):
      summary = jobs.train(job, 6, 2, show=lines.append)
    self.assertEqual(summary["status"], "done")
    self.assertTrue(any("checkpoint is at step 6 >= 6" in line for line in lines), lines)
    self.assertTrue(os.path.exists(job.path("train_done.json")))

  def test_a_run_the_graph_guard_stops_counts_as_diverged(self):
    job = _job(os.path.join(self.dir, "guard"))
    message = ("st_moe.GuardedOptimizer stopped the run at step 5: 10 consecutive steps with a "
               "non-finite gradient")

    def fake_run(model_dir, gin_files, gin_params, **kwargs):
      del gin_files, gin_params, kwargs
      log = os.path.join(model_dir, "logs", "j.0.log")
      os.makedirs(os.path.dirname(log), exist_ok=True)
      with open(log, "w") as f:
        f.write(f"Traceback (most recent call last):\ntensorflow.errors.InvalidArgumentError: "
                f"{message}\n")
      return runner.RunResult(model_dir=model_dir, command=["t5_mesh_transformer"],
                              returncode=1, log_path=log)

    with mock.patch.object(runner, "run", fake_run):
      summary = jobs.train(job, 6, 2, show=lambda line: None)
    self.assertEqual(summary["status"], "diverged")
    self.assertEqual(summary["diverged"], message)
    self.assertTrue(os.path.exists(job.path("diverged.json")))

  def _job_at(self, name, step, weights=True):
    """A Job whose `checkpoint` file names step `step`; checkpoints 1..step there if `weights`."""
    job = _job(os.path.join(self.dir, name))
    if weights:
      checkpoint_files.write_checkpoints(job.model_dir, steps=step)
    else:
      os.makedirs(job.model_dir)
      with open(job.path("checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "model.ckpt-{step}"\n')
    return job

  def test_evaluation_is_cached_for_its_step_and_settings(self):
    job = self._job_at("eval", 4)
    # Every evaluation fixes its data's seed first (span corruption's masks are random otherwise).
    jobs.write_json(job.path("eval_cf2.json"), {
        "step": 4, "eval_steps": 1, "gin_params": ["mesh_eval_dataset_fn.seed = 0", "x = 1"],
        "eval_gin_files": ["perplexity_eval.gin"], "neg_log_perplexity": -3.5})
    with mock.patch.object(runner, "run", _no_run):
      found = jobs.evaluate(job, "eval_cf2", eval_steps=1, gin_params=["x = 1"])
    self.assertEqual(found["neg_log_perplexity"], -3.5)
    with mock.patch.object(runner, "run", _no_run):  # another eval_steps: evaluated again
      with self.assertRaisesRegex(AssertionError, "runner.run called"):
        jobs.evaluate(job, "eval_cf2", eval_steps=2, gin_params=["x = 1"])

  def test_evaluation_of_a_run_without_its_checkpoint_is_named_before_running(self):
    # An archived run: its `checkpoint` index names step 1000, its model.ckpt-1000.* are gone.
    job = self._job_at("archived", 1000, weights=False)
    with mock.patch.object(runner, "run", _no_run):
      with self.assertRaisesRegex(
          jobs.MissingCheckpointError,
          r"\[j\] evaluation eval_cf3 \(x = 3\) is not cached and needs the step-1000 "
          r"checkpoint of .*archived, which cannot be read: its index file "
          r".*archived/model.ckpt-1000.index is missing .* move .*archived aside and rerun"):
        jobs.evaluate(job, "eval_cf3", eval_steps=1, gin_params=["x = 3"])

  def test_evaluation_of_a_partly_written_checkpoint_is_named_before_running(self):
    # The data shard of step 7 is cut to half the bytes its index lists.
    job = self._job_at("partial", 7)
    half = checkpoint_files.DATA_BYTES // 2
    checkpoint_files.truncate(checkpoint_files.data_file(job.path("model.ckpt-7")), half)
    with mock.patch.object(runner, "run", _no_run):
      with self.assertRaisesRegex(
          jobs.MissingCheckpointError,
          r"evaluation eval_cf2 \(default settings\) is not cached and needs the step-7 "
          rf"checkpoint of .*partial, which cannot be read: its data files hold {half} bytes but "
          rf"its index lists {checkpoint_files.DATA_BYTES} bytes of tensors"):
        jobs.evaluate(job, "eval_cf2", eval_steps=1)

  def test_evaluation_fixes_the_seed_of_its_data(self):
    job = self._job_at("eval_seed", 4)
    seen = []

    def fake_run(model_dir, gin_files, params, **kwargs):
      seen.append(params)
      return runner.RunResult(model_dir=model_dir, command=["t5_mesh_transformer"], returncode=1,
                              log_path=os.path.join(self.dir, "none.log"))

    with mock.patch.object(runner, "run", fake_run):
      with self.assertRaisesRegex(RuntimeError, "evaluation eval_cf2 failed"):
        jobs.evaluate(job, "eval_cf2", eval_steps=1, gin_params=["x = 1"])
    (params,) = seen
    # t5's mesh_eval_dataset_fn passes it to seqio's get_dataset; the caller's bindings come after.
    self.assertLess(params.index("mesh_eval_dataset_fn.seed = 0"), params.index("x = 1"))

  def test_a_trace_is_cached_for_its_step_and_settings(self):
    job = _job(os.path.join(self.dir, "trace"))
    out = os.path.join(self.dir, "trace", "trace_cf2")
    os.makedirs(out)
    with open(job.path("checkpoint"), "w") as f:
      f.write('model_checkpoint_path: "model.ckpt-6"\n')
    jobs.write_json(os.path.join(out, "routing.json"), [{"fraction_dropped": 0.25}])
    jobs.write_text(os.path.join(out, "routing.md"), "# routing\n")
    meta = dict(step=6, task="some_task", split="validation", num_tokens=64,
                gin_params=job.model_params(), capacity_factor_eval=2.0, command="python -m x")
    jobs.write_json(os.path.join(out, "trace_meta.json"), meta)
    with mock.patch.object(jobs, "_run_child", _no_run):
      found = jobs.trace(job, {2.0: out}, num_tokens=64)
    self.assertEqual(found[2.0]["layers"], [{"fraction_dropped": 0.25}])
    self.assertEqual(found[2.0]["command"], "python -m x")
    with mock.patch.object(jobs, "_run_child", _no_run):  # other tokens: traced again
      with self.assertRaisesRegex(AssertionError, "runner.run called"):
        jobs.trace(job, {2.0: out}, num_tokens=128)

  def test_child_rejects_an_unknown_op(self):
    proc = subprocess.run(jobs.child_command({"op": "fly"}), capture_output=True, text=True,
                          check=False)
    self.assertEqual(proc.returncode, 1)
    self.assertIn("op='fly': must be one of trace, count", proc.stderr)


class PortableCommandTest(absltest.TestCase):

  def test_paths_become_out_and_the_line_still_parses(self):
    out = "/data/my run/capacity"  # the table's folder; --out is its parent, with a space
    cmd = runner.shell_quote([
        os.path.join(os.path.dirname(sys.executable), "python"), "-m", "st_moe.experiments.jobs",
        '{"model_dir": "/data/my run/runs/r0"}', "--model_dir=/data/my run/runs/r0"])
    line = common.portable_command(cmd, out)
    self.assertNotIn("/data/my run", line)
    self.assertTrue(line.startswith("python -m st_moe.experiments.jobs "), line)
    env_out = "/elsewhere/x y"
    got = subprocess.run(["bash", "-c", f"OUT='{env_out}'; for a in {line}; do echo \"$a\"; done"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    self.assertEqual(got[3:], ['{"model_dir": "/elsewhere/x y/runs/r0"}',
                               "--model_dir=/elsewhere/x y/runs/r0"])


class RunAllTest(absltest.TestCase):
  """Runs side by side (--jobs): all started at once, results in the items' order, lines tagged."""

  def _items(self, n):
    return [jobs.Job(f"r{i}", f"/nonexistent/r{i}", [], [], "t", jobs.Shape(1, 2, 2))
            for i in range(n)]

  def test_two_jobs_overlap_and_keep_order(self):
    barrier = threading.Barrier(2, timeout=20)  # broken unless two runs are in flight together
    lines = []

    def prepare(item, show):
      barrier.wait()
      time.sleep(0.2 if item.name == "r0" else 0.0)  # r0 finishes last
      show("step 1")
      show(f"[{item.name}] done")
      return item.name.upper()

    self.assertEqual(jobs.run_all(self._items(2), prepare, 2, lines.append), ["R0", "R1"])
    self.assertCountEqual(lines, ["[r0] step 1", "[r1] step 1", "[r0] done", "[r1] done"])

  def test_one_job_runs_one_at_a_time(self):
    active, peak = [0], [0]

    def prepare(item, show):
      del show
      active[0] += 1
      peak[0] = max(peak[0], active[0])
      time.sleep(0.05)
      active[0] -= 1
      return item.name

    self.assertEqual(jobs.run_all(self._items(3), prepare, 1, print), ["r0", "r1", "r2"])
    self.assertEqual(peak[0], 1)

  def test_a_failing_run_is_raised(self):
    def prepare(item, show):
      del show
      if item.name == "r1":
        raise RuntimeError("training failed for r1")
      return item.name

    with self.assertRaisesRegex(RuntimeError, "training failed for r1"):
      jobs.run_all(self._items(3), prepare, 2, print)


class StabilityRowsTest(absltest.TestCase):
  """The table's bookkeeping of stable and diverged seeds, on summaries given by hand."""

  def test_diverged_seed_is_listed_and_left_out_of_quality(self):
    config = common.Config(seeds=3, baseline_seeds=3, variants=("baseline",))
    runs = stability.plan(config)
    runs[("baseline", 0)].summary = {"status": "done", "router_z_loss": 2.0,
                                     "router_max_logit": 1.0}
    runs[("baseline", 1)].summary = {"status": "diverged", "diverged": "loss is nan at step 7",
                                     "diverged_step": 7, "router_z_loss": float("inf"),
                                     "router_max_logit": 9.0}
    runs[("baseline", 2)].summary = {"status": "done", "router_z_loss": 4.0,
                                     "router_max_logit": 2.0}
    quality = {("baseline", 0): -2.0, ("baseline", 1): None, ("baseline", 2): -3.0}
    (row,) = stability.rows(config, runs, quality)
    row = dict(zip(stability.HEADERS, row))
    self.assertEqual(row["stable runs"], "2/3")
    self.assertEqual(row["diverged runs"], "seed 1 at step 7")
    # mean -2.5; sample std of (-2, -3) = sqrt(0.5) = 0.707
    self.assertEqual(row["quality (ours)"], "-2.500 +- 0.707")
    # z-loss: the infinite one left out: mean 3, sample std of (2, 4) = sqrt(2) = 1.414; the
    # diverged seed's finite max logit counts: (1, 9, 2) -> mean 4, std sqrt(19) = 4.359.
    self.assertEqual(row["router z-loss (last step)"], "3.000 +- 1.414")
    self.assertEqual(row["max router logit (last step)"], "4.000 +- 4.359")

  def test_small_scale_trains_300_steps_with_its_own_run_file(self):
    config = common.config_for("stability", "small", out="/o", variants=("baseline",))
    self.assertEqual(config.steps, 300)
    self.assertEqual(common.config_for("stability", "small", steps=50).steps, 50)
    self.assertEqual(common.config_for("capacity", "small").steps, 1000)
    run = stability.plan(config)[("baseline", 5)]  # 6 baseline seeds: twice the default 3
    self.assertEqual(run.job.run_files(),
                     ["dataset.gin", "st_moe_small.gin", "cpu.gin", "stability_small.gin"])

  def test_run_folders_and_bindings(self):
    config = common.Config(out="/o", seeds=1, variants=("router_z_loss",), gin_params=("a = 1",))
    run = stability.plan(config)[("router_z_loss", 0)]
    self.assertEqual(run.model_dir, "/o/runs/stability_router_z_loss_seed0")
    self.assertEqual(run.job.run_files(),
                     ["dataset.gin", "st_moe_tiny.gin", "cpu.gin", "stability_tiny.gin"])
    self.assertEqual(run.job.gin_params, ["st_moe.seeded_train_dataset_fn.seed = 0",
                                          "router_z_loss_coef = 0.001", "a = 1"])


if __name__ == "__main__":
  absltest.main()
