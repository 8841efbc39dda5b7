"""tools/archive_runs.py (st_moe.experiments.archive): a finished run saved without its checkpoints
and restored into a fresh output folder is skipped there, its evaluation and curve intact.

The run folders are made here: bookkeeping JSON as st_moe.experiments.jobs writes it, a checkpoint's
files, an event file of losses written with tf.summary, a routing trace. Nothing trains.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import tensorflow as tf

from st_moe.experiments import archive
from st_moe.experiments import events
from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments.tables import sparse_vs_dense

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "archive_runs.py")
LOSSES = {1: 5.5, 2: 5.25, 3: 4.75, 4: 4.5}  # step -> training loss of the finished run
STEPS = 4
LAYER = "decoder/block_001/SparseFFN"
BALANCE, Z_LOSS = 2.0, 10.0  # every step: aux loss 0.01 x 2.0 + 0.001 x 10.0 = 0.03
EVAL = {"step": STEPS, "eval_steps": 1, "gin_params": ["mesh_eval_dataset_fn.seed = 0"],
        "eval_gin_files": ["perplexity_eval.gin"], "neg_log_perplexity": -4.25}


def _job(out, name):
  return jobs.Job(name=name, model_dir=os.path.join(out, "runs", name), gin_files=["st_moe_tiny.gin"],
                  gin_params=["st_moe.seeded_train_dataset_fn.seed = 0"], task="some_task",
                  shape=jobs.Shape(4, 32, 8))


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def make_run(out, name, finished):
  job = _job(out, name)
  d = job.model_dir
  _write(os.path.join(d, "job.json"), json.dumps(job.settings()))
  last = STEPS if finished else 2
  _write(os.path.join(d, "checkpoint"), f'model_checkpoint_path: "model.ckpt-{last}"\n')
  _write(os.path.join(d, f"model.ckpt-{last}.index"), "index")
  _write(os.path.join(d, f"model.ckpt-{last}.data-00000-of-00001"), "weights" * 100)
  _write(os.path.join(d, "logs", f"{name}.0.log"), "a log\n")
  _write(os.path.join(d, "operative_config.gin"),
         "balance_loss_coef = 0.01\nrouter_z_loss_coef = 0.001\n")
  writer = tf.summary.create_file_writer(d)
  with writer.as_default():
    for step, loss in LOSSES.items():
      if step <= last:
        tf.summary.scalar("loss", loss, step=step)
        tf.summary.scalar(f"{LAYER}/router/entropy", 1.0, step=step)
        tf.summary.scalar(f"{LAYER}/router/balance_loss", BALANCE, step=step)
        tf.summary.scalar(f"{LAYER}/router/z_loss", Z_LOSS, step=step)
  writer.close()
  if finished:
    _write(os.path.join(d, "train_done.json"),
           json.dumps({"train_steps": STEPS, "status": "done", "final_train_loss": LOSSES[STEPS]}))
    _write(os.path.join(d, "eval_cf2.json"),
           json.dumps(dict(EVAL, command=f"t5_mesh_transformer --model_dir={d}")))
    _write(os.path.join(d, "trace_cf2", "routing.json"), json.dumps([{"layer": "encoder"}]))
    _write(os.path.join(d, "trace_cf2", "trace_meta.json"), json.dumps({"step": STEPS}))
  return job


class ArchiveTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix="archive_test_")
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.out = os.path.join(self.tmp, "out")
    self.done = make_run(self.out, "done_seed0", finished=True)
    make_run(self.out, "training_seed1", finished=False)
    self.archive = os.path.join(self.tmp, "archive")

  def test_saves_finished_runs_without_checkpoints_or_logs(self):
    self.assertEqual(archive.save(self.out, self.archive, show=lambda _: None), ["done_seed0"])
    self.assertEqual(os.listdir(self.archive), ["done_seed0"])  # the unfinished run stays out
    names = sorted(os.listdir(os.path.join(self.archive, "done_seed0")))
    self.assertEqual([n for n in names if not n.startswith("events.out.tfevents.")],
                     ["checkpoint", "eval_cf2.json", "job.json", "operative_config.gin",
                      "trace_cf2", "train_done.json"])
    self.assertLen([n for n in names if n.startswith("events.out.tfevents.")], 1)
    self.assertEqual(sorted(os.listdir(os.path.join(self.archive, "done_seed0", "trace_cf2"))),
                     ["routing.json", "trace_meta.json"])

  def test_a_trained_run_not_yet_evaluated_stays_out_and_a_diverged_run_goes_in(self):
    # Trained to step 4, evaluated only at step 2 (an earlier evaluation, as when a fine-tuning
    # run's decoding was interrupted): without checkpoints it could never be evaluated at step 4.
    pending = make_run(self.out, "trained_seed2", finished=True)
    os.remove(os.path.join(pending.model_dir, "eval_cf2.json"))
    _write(os.path.join(pending.model_dir, "decode_all.json"), json.dumps(dict(EVAL, step=2)))
    diverged = make_run(self.out, "diverged_seed3", finished=False)  # stopped at step 2
    _write(os.path.join(diverged.model_dir, "diverged.json"),
           json.dumps({"status": "diverged", "diverged": "loss is NaN"}))
    lines = []
    self.assertEqual(archive.save(self.out, self.archive, show=lines.append),
                     ["diverged_seed3", "done_seed0"])
    self.assertEqual(sorted(os.listdir(self.archive)), ["diverged_seed3", "done_seed0"])
    self.assertEqual(
        [l for l in lines if l.startswith("[trained_seed2]")],
        ["[trained_seed2] not archived: trained, but its last checkpoint (step 4) has no evaluation "
         "yet, and the archive keeps no checkpoints; evaluate it (rerun its table) and save again"])
    # Once evaluated at its last step, it is archived.
    _write(os.path.join(pending.model_dir, "decode_all.json"), json.dumps(EVAL))
    self.assertIn("trained_seed2", archive.save(self.out, self.archive, show=lambda _: None))

  def test_restored_run_is_skipped_with_its_evaluation_and_curve(self):
    archive.save(self.out, self.archive, show=lambda _: None)
    fresh = os.path.join(self.tmp, "fresh")
    self.assertEqual(archive.restore(self.archive, fresh, show=lambda _: None), ["done_seed0"])
    job = _job(fresh, "done_seed0")
    lines = []
    summary = jobs.train(job, STEPS, 2, show=lines.append)  # would start t5_mesh_transformer
    self.assertEqual(summary["final_train_loss"], LOSSES[STEPS])
    self.assertIn("already trained", lines[0])
    evaluated = jobs.evaluate(job, "eval_cf2", eval_steps=1, show=lines.append)
    self.assertEqual(evaluated["neg_log_perplexity"], EVAL["neg_log_perplexity"])
    # The recorded command names the folder it now lives in, not the one it was trained in.
    self.assertEqual(evaluated["command"], f"t5_mesh_transformer --model_dir={job.model_dir}")
    self.assertLen(lines, 1)  # no "evaluating" line: the cached result
    self.assertEqual(runner.steps_and_losses(job.model_dir),
                     (list(LOSSES), list(LOSSES.values())))
    # The auxiliary losses came along (the entropy did not): the cross-entropy of steps 1-2 is
    # (5.5 + 5.25) / 2 - 0.03 = 5.345, of steps 3-4 (4.75 + 4.5) / 2 - 0.03 = 4.595.
    windows = sparse_vs_dense.cross_entropy_windows(job.model_dir, STEPS, windows=2)
    self.assertEqual([round(w, 6) for w in windows], [5.345, 4.595])
    reader = events.EventReader(job.model_dir)
    reader.poll()
    self.assertEqual(sorted(reader.scalars), [f"{LAYER}/router/balance_loss",
                                              f"{LAYER}/router/z_loss", "loss"])

  def test_restore_never_overwrites_a_run_folder(self):
    archive.save(self.out, self.archive, show=lambda _: None)
    with open(os.path.join(self.out, "runs", "done_seed0", "eval_cf2.json"), "w") as f:
      f.write('{"neg_log_perplexity": -1.0}')
    self.assertEqual(archive.restore(self.archive, self.out, show=lambda _: None), [])
    with open(os.path.join(self.out, "runs", "done_seed0", "eval_cf2.json")) as f:
      self.assertEqual(json.load(f), {"neg_log_perplexity": -1.0})

  def test_save_keeps_an_archived_run_of_another_training(self):
    archive.save(self.out, self.archive, show=lambda _: None)
    run_dir = os.path.join(self.out, "runs", "done_seed0")
    # The same training, evaluated once more: archived again, the new evaluation with it.
    _write(os.path.join(run_dir, "eval_cf8.json"), json.dumps(dict(EVAL, neg_log_perplexity=-4.0)))
    self.assertEqual(archive.save(self.out, self.archive, show=lambda _: None), ["done_seed0"])
    self.assertTrue(os.path.exists(os.path.join(self.archive, "done_seed0", "eval_cf8.json")))
    # Trained again (another wall time in its train_done.json): the archived run stays as it was.
    _write(os.path.join(run_dir, "train_done.json"),
           json.dumps({"train_steps": STEPS, "status": "done", "final_train_loss": LOSSES[STEPS],
                       "seconds": 12.5}))
    os.remove(os.path.join(run_dir, "eval_cf8.json"))
    lines = []
    self.assertEqual(archive.save(self.out, self.archive, show=lines.append), [])
    dest = os.path.join(self.archive, "done_seed0")
    self.assertEqual(lines, [f"[done_seed0] not archived: {dest} holds another training of this "
                             "run (train_done.json differs: trained again since it was archived); "
                             "kept as it is; delete it to archive this one"])
    with open(os.path.join(dest, "train_done.json")) as f:
      self.assertNotIn("seconds", json.load(f))
    self.assertTrue(os.path.exists(os.path.join(dest, "eval_cf8.json")))
    # Deleted from the archive, it is archived.
    shutil.rmtree(dest)
    self.assertEqual(archive.save(self.out, self.archive, show=lambda _: None), ["done_seed0"])

  def test_tool_saves_restores_and_names_a_missing_archive(self):
    def tool(*args):
      return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                            timeout=300)
    saved = tool("save", f"--out={self.out}", f"--archive={self.archive}")
    self.assertEqual(saved.returncode, 0, saved.stderr[-2000:])
    self.assertIn("1 finished run(s)", saved.stdout)
    fresh = os.path.join(self.tmp, "fresh")
    restored = tool("restore", f"--out={fresh}", f"--archive={self.archive}")
    self.assertEqual(restored.returncode, 0, restored.stderr[-2000:])
    self.assertTrue(os.path.exists(os.path.join(fresh, "runs", "done_seed0", "train_done.json")))
    missing = os.path.join(self.tmp, "nowhere")
    bad = tool("restore", f"--out={fresh}", f"--archive={missing}")
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn(f"--archive={missing}: no such folder", bad.stderr)


if __name__ == "__main__":
  absltest.main()
