"""Fine-tuning and evaluation by decoding through the real entry point, `t5_mesh_transformer`.

setUpClass pretrains st_moe_tiny (1 + 1 layers) for 2 steps (pretrain_c4.gin on the span-corruption
task of tests/testing_tasks.py), then fine-tunes that checkpoint with finetune.gin for 3 steps on
the reverse-a-word task, once per `utils.run.variable_filter` (None, %FREEZE_MOE, %ONLY_MOE), the
three in parallel; then evaluates the unfiltered fine-tune with eval.gin twice, in parallel, into
two summary folders. The tests read what the runs wrote:

  * the checkpoints (tf.train.load_checkpoint): a variable is frozen exactly when the filter
    excludes it. The expectation is spelled out here from the layer names (sparse layers live
    under `/sparse_ffn/`), not taken from the gin file's regexes;
  * the evaluation: metrics (event files), predictions and targets; the accuracy the run wrote
    equals the exact-match rate of its predictions against its targets, on the validation split,
    and the two evaluations of the same checkpoint agree to the last bit.

Each t5_mesh_transformer process spends ~25 s starting; five of them run two at a time or more.
"""
import glob
import os
import shutil
import subprocess
import tempfile

from absl.testing import absltest

import entry_point
import numpy as np
import tensorflow as tf

import testing_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = entry_point.ENTRY_POINT
TIMEOUT = 1800  # per process; a loaded 2-core machine needs it
PRETRAIN_STEPS, FINETUNE_STEPS = 2, 3
FILTERS = {"none": "None", "freeze_moe": "%FREEZE_MOE", "only_moe": "%ONLY_MOE"}
TASK = testing_tasks.REVERSE_TASK_NAME
def _params(*params):
  return [f"--gin_param={p}" for p in params]


# st_moe_tiny with 1 + 1 layers (entry_point.ONE_LAYER): one sparse layer per stack.
COMMON = ["--module_import=testing_tasks", "--gin_file=st_moe_tiny.gin", "--gin_file=cpu.gin",
          *_params(*entry_point.ONE_LAYER)]


_env = entry_point.env


def _start(args, cwd, name):
  """Starts the entry point with its output in <cwd>/<name>.log (no pipe to fill and block)."""
  with open(os.path.join(cwd, name + ".log"), "w") as log:
    process = subprocess.Popen([ENTRY_POINT, *args], stdout=log, stderr=subprocess.STDOUT,
                               text=True, env=_env(), cwd=cwd)
  process.log_path = log.name
  return process


def _wait(processes):
  """Waits for {name: Popen}; raises with the log's tail if one failed; returns the logs."""
  logs = {}
  for name, process in processes.items():
    process.wait(timeout=TIMEOUT)
    with open(process.log_path) as f:
      logs[name] = f.read()
  for name, process in processes.items():
    if process.returncode:
      raise RuntimeError(f"{name} exited {process.returncode}:\n{logs[name][-5000:]}")
  return logs


def _is_model_variable(name):
  """Weights of the model (not the step, not Adafactor's slots)."""
  return name != "global_step" and "_slot_" not in name


class FinetuneTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="st_moe_finetune_")
    cls.processes = []
    try:
      cls._run_all()
    except BaseException:
      cls.tearDownClass()
      raise

  @classmethod
  def _run_all(cls):
    tmp = cls.tmp
    cls.pretrained = os.path.join(tmp, "pretrain")
    pretrain = _start(COMMON + [
        f"--model_dir={cls.pretrained}", "--gin_file=pretrain_c4.gin"] + _params(
            "MIXTURE_NAME = 'st_moe_test_bytes_span_corruption'",
            "utils.run.sequence_length = {'inputs': 64, 'targets': 16}",
            "utils.run.batch_size = ('sequences_per_batch', 4)",
            f"utils.run.train_steps = {PRETRAIN_STEPS}",
            f"utils.run.save_checkpoints_steps = {PRETRAIN_STEPS}",
            f"utils.run.iterations_per_loop = {PRETRAIN_STEPS}"), tmp, "pretrain")
    cls.processes.append(pretrain)
    _wait({"pretrain": pretrain})
    cls.init_checkpoint = os.path.join(cls.pretrained, f"model.ckpt-{PRETRAIN_STEPS}")
    cls.final_step = PRETRAIN_STEPS + FINETUNE_STEPS
    finetunes = {}
    for name, variable_filter in FILTERS.items():
      finetunes[name] = _start(COMMON + [
          f"--model_dir={os.path.join(tmp, name)}", "--gin_file=finetune.gin"] + _params(
              f"MIXTURE_NAME = '{TASK}'",
              f"utils.run.init_checkpoint = '{cls.init_checkpoint}'",
              f"utils.run.train_steps = {cls.final_step}",
              "utils.run.sequence_length = {'inputs': 16, 'targets': 16}",
              "utils.run.batch_size = ('sequences_per_batch', 8)",
              f"utils.run.save_checkpoints_steps = {FINETUNE_STEPS}",
              f"utils.run.iterations_per_loop = {FINETUNE_STEPS}",
              f"utils.run.variable_filter = {variable_filter}",
              # Master weights are bfloat16 (mtf's default master_dtype): a 1.0 norm scale moves
              # in steps of 2^-7, so at finetune.gin's 1e-3 three updates can round back to the
              # same value. At 1e-2 (the demo's) every trained variable changes.
              "learning_rate_schedules.constant_learning_rate.learning_rate = 1e-2"), tmp, name)
      cls.processes.append(finetunes[name])
    cls.finetune_logs = _wait(finetunes)
    evals = {}
    cls.eval_dirs = {"first": os.path.join(tmp, "none", "validation_eval"),
                     "again": os.path.join(tmp, "eval_again")}
    for name, summary_dir in cls.eval_dirs.items():
      extra = [] if name == "first" else [f"utils.run.eval_summary_dir = '{summary_dir}'"]
      evals[name] = _start(COMMON + [
          f"--model_dir={os.path.join(tmp, 'none')}", "--gin_file=dataset.gin",
          "--gin_file=eval.gin"] + _params(
              f"MIXTURE_NAME = '{TASK}'",
              f"eval_checkpoint_step = {cls.final_step}",
              "utils.run.sequence_length = {'inputs': 16, 'targets': 16}",
              "utils.run.batch_size = ('sequences_per_batch', 16)",
              "Bitransformer.decode.max_decode_length = 16", *extra), tmp, "eval_" + name)
      cls.processes.append(evals[name])
    cls.eval_logs = _wait(evals)

  @classmethod
  def tearDownClass(cls):
    for process in cls.processes:
      if process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _variables(self, checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    names = [n for n in reader.get_variable_to_shape_map() if _is_model_variable(n)]
    return {n: reader.get_tensor(n) for n in names}

  def test_variable_filters_freeze_exactly_what_they_exclude(self):
    before = self._variables(self.init_checkpoint)
    sparse = {n for n in before if "/sparse_ffn/" in n}
    # The sparse layers: router, experts and their pre-norm, in encoder and decoder.
    self.assertTrue(any(n.endswith("router/kernel") for n in sparse), sorted(sparse))
    self.assertTrue(any(n.endswith("wo/kernel") for n in sparse), sorted(sparse))
    self.assertTrue({n.split("/")[0] for n in sparse} == {"encoder", "decoder"}, sorted(sparse))
    self.assertGreater(len(before) - len(sparse), len(sparse))
    trained_sets = {"none": set(before), "freeze_moe": set(before) - sparse, "only_moe": sparse}
    for name, trained in trained_sets.items():
      with self.subTest(variable_filter=FILTERS[name]):
        checkpoint = os.path.join(self.tmp, name, f"model.ckpt-{self.final_step}")
        after = self._variables(checkpoint)
        self.assertEqual(set(after), set(before))
        self.assertEqual(tf.train.load_checkpoint(checkpoint).get_tensor("global_step"),
                         self.final_step)
        for variable, value in before.items():
          if variable in trained:
            self.assertFalse(np.array_equal(after[variable], value), f"{variable} unchanged")
          else:
            np.testing.assert_array_equal(after[variable], value, err_msg=f"{variable} changed")

  def _written(self, summary_dir):
    """(metrics {tag: value}, predictions, targets) as the evaluation wrote them."""
    metrics = {}
    for path in glob.glob(os.path.join(summary_dir, "events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        if event.step != self.final_step:
          continue
        for value in event.summary.value:
          metrics[value.tag] = value.simple_value
    predictions = entry_point.read_eval_lines(
        os.path.join(summary_dir, f"{TASK}_{self.final_step}_predictions"))
    targets = entry_point.read_eval_lines(os.path.join(summary_dir, f"{TASK}_targets"))
    return metrics, predictions, targets

  def test_eval_decodes_the_validation_split_and_writes_its_metric(self):
    metrics, predictions, targets = self._written(self.eval_dirs["first"])
    # The validation split: the last words of testing_tasks' list, reversed (train would be the
    # other 1,600-odd words).
    words = testing_tasks._words()[-testing_tasks.REVERSE_VALIDATION_SIZE:]  # pylint: disable=protected-access
    self.assertEqual(targets, [w[::-1] for w in words])
    self.assertLen(predictions, len(targets))
    accuracy = metrics[f"eval/{TASK}/accuracy"]
    exact = 100.0 * np.mean([p == t for p, t in zip(predictions, targets)])
    self.assertAlmostEqual(accuracy, exact, places=4)

  def test_the_same_checkpoint_evaluates_the_same_twice(self):
    first = self._written(self.eval_dirs["first"])
    again = self._written(self.eval_dirs["again"])
    self.assertNotEmpty(first[0])
    self.assertEqual(first, again)


if __name__ == "__main__":
  absltest.main()
