"""The real entry point, as the README writes it: `t5_mesh_transformer --gin_file=st_moe_tiny.gin
--gin_file=cpu.gin --gin_file=pretrain_c4.gin ...` with no --module_import for the project (the
installed st_moe_gin.pth lets gin find the files; the gin files import st_moe.register) trains on
CPU, writes a checkpoint and operative_config.gin with no "Path not found" lines, and a second run
with the older `--module_import=st_moe` resumes from that checkpoint; a layout whose mesh dimension
does not divide the experts fails naming the dimension.

Data: the in-memory SeqIO task of tests/testing_tasks.py (Python's own pydoc text, byte vocabulary,
span corruption), imported with --module_import=testing_tasks. Each process spends ~25 s starting.
"""
import os
import re
import shutil
import subprocess
import tempfile

from absl.testing import absltest

import entry_point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = entry_point.ENTRY_POINT
TIMEOUT = 400


_command = entry_point.tiny_command
_env = entry_point.env


def _steps(log):
  """Global steps of the per-step loss lines mesh_tensorflow prints: step, tf_loss[loss][step].

  mesh_tensorflow reads the global step for that print unordered with its increment, so a line
  may show the step before or after it: callers check the count and the range.
  """
  return [int(s) for s in re.findall(r"tf_loss\[[-0-9.e]+\]\[(\d+)\]", log)]


class TrainEntryPointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="st_moe_entry_")
    # Started now, read in test_wrong_layout: its ~25 s of start-up overlaps the training runs.
    cls.wrong_layout = subprocess.Popen(
        _command(os.path.join(cls.tmp, "wrong"), "utils.run.train_steps = 1",
                 "utils.run.mesh_shape = 'batch:3'",
                 "utils.run.batch_size = ('sequences_per_batch', 6)"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cls.tmp)

  @classmethod
  def tearDownClass(cls):
    if cls.wrong_layout.poll() is None:
      cls.wrong_layout.kill()
      cls.wrong_layout.communicate()
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _run(self, model_dir, steps, module_imports=("testing_tasks",)):
    out = subprocess.run(_command(model_dir, f"utils.run.train_steps = {steps}",
                                  module_imports=module_imports),
                         capture_output=True, text=True, env=_env(), cwd=self.tmp,
                         timeout=TIMEOUT, check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-5000:])
    return out.stderr + out.stdout

  def test_trains_writes_checkpoint_and_config_then_resumes(self):
    model_dir = os.path.join(self.tmp, "model")
    log = self._run(model_dir, 2)  # no --module_import of the project
    self.assertNotIn("Path not found", log)
    self.assertTrue(os.path.exists(os.path.join(model_dir, "model.ckpt-2.index")),
                    os.listdir(model_dir))
    with open(os.path.join(model_dir, "operative_config.gin")) as f:
      operative = f.read()
    self.assertIn("num_experts = 4", operative)
    self.assertIn("sparse_layer_stack.sparse_ffn_layer = @st_moe.SparseFFN", operative)
    self.assertIn("MIXTURE_NAME = 'st_moe_test_bytes_span_corruption'", operative)
    steps = _steps(log)
    self.assertLen(steps, 2, log[-3000:])
    self.assertTrue(all(0 <= s <= 2 for s in steps), steps)
    losses = {float(x) for x in re.findall(r"Loss for final step: ([0-9]+\.[0-9]+)", log)}
    self.assertLen(losses, 1, log[-3000:])
    self.assertTrue(0.0 < losses.pop() < 100.0)

    log = self._run(model_dir, 4, module_imports=("st_moe", "testing_tasks"))
    self.assertRegex(log, r"Restoring parameters from .*model\.ckpt-2")
    self.assertTrue(os.path.exists(os.path.join(model_dir, "model.ckpt-4.index")),
                    os.listdir(model_dir))
    self.assertNotRegex(log, r"Saving checkpoints for 0 into")  # resumed, not restarted
    steps = _steps(log)  # the global step continues from 2
    self.assertLen(steps, 2, log[-3000:])
    self.assertTrue(all(2 <= s <= 4 for s in steps), steps)
    self.assertRegex(log, r"Saving checkpoints for 4 into")

  def test_wrong_layout_fails_naming_the_dimension(self):
    _, stderr = self.wrong_layout.communicate(timeout=TIMEOUT)
    self.assertNotEqual(self.wrong_layout.returncode, 0, stderr[-3000:])
    self.assertRegex(stderr, r"num_experts=4 is not divisible by 3.*'experts'")
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "wrong", "model.ckpt-0.index")))


if __name__ == "__main__":
  absltest.main()
