"""Errors that say what to change: unreadable checkpoints, batch sizes the mesh does not divide, an
unreadable vocabulary; and that the "not prepared" error still comes when the vocabulary is there.

Checkpoints are real (checkpoint_files.py): tf.train.Saver (sharded, relative paths, as
mesh_tensorflow saves) writes model.ckpt-1..3 of three small variables; the latest is then
truncated, emptied of its data file or its index, or has bytes flipped. That a truncated checkpoint
really cannot be restored and the earlier one can is checked with tf.train.Saver itself (the
independent reference). Expected batch sizes are worked out by hand in the comments. The
end-to-end cases run the real console script (`t5_mesh_transformer`, four processes started
together in setUpClass); this machine has no network, so T5's gs:// vocabulary is unreachable, as
for an offline user.
"""
import os
import re
import shutil
import subprocess
import tempfile

from absl.testing import absltest
import gin
import numpy as np
import tensorflow.compat.v1 as tf

import checkpoint_files
import graph_mode
import guard_test
from st_moe import guard
from st_moe.experiments import checkpoints
from st_moe.tasks import vocab

setUpModule = graph_mode.enter
tearDownModule = graph_mode.leave


class JobsFallBackTest(absltest.TestCase):

  def test_training_resumes_from_the_last_readable_checkpoint_with_a_warning(self):
    from unittest import mock  # pylint: disable=g-import-not-at-top
    from st_moe.experiments import jobs  # pylint: disable=g-import-not-at-top
    from st_moe.experiments import runner  # pylint: disable=g-import-not-at-top
    model_dir = tempfile.mkdtemp(prefix="jobs_fall_back_")
    prefixes = checkpoint_files.write_checkpoints(model_dir, steps=3)
    data = checkpoint_files.data_file(prefixes[2])
    checkpoint_files.truncate(data, 4)  # step 3 killed while writing
    job = jobs.Job(name="j", model_dir=model_dir, gin_files=["st_moe_tiny.gin", "cpu.gin"],
                   gin_params=[], task="some_task", shape=jobs.Shape(4, 32, 8))
    lines = []
    def no_run(*args, **kwargs):
      raise AssertionError("runner.run called")
    with mock.patch.object(runner, "run", no_run):
      summary = jobs.train(job, 2, 1, show=lines.append)
    warnings = [line for line in lines if "WARNING" in line]
    self.assertLen(warnings, 1, lines)
    self.assertIn("from its checkpoint of step 2", warnings[0])
    self.assertTrue(os.path.exists(data + ".unreadable"))
    # Step 2 is the latest again (Saver's own restore of it gives a = 1 + 2).
    self.assertEqual(tf.train.latest_checkpoint(model_dir), prefixes[1])
    np.testing.assert_array_equal(checkpoint_files.restore(prefixes[1]), np.full([3, 5], 3.0))
    self.assertEqual(summary["status"], "done")


class CheckpointsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp(prefix="st_moe_ckpt_")
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
    self.prefixes = checkpoint_files.write_checkpoints(self.dir)
    self.data = checkpoint_files.data_file(self.prefixes[-1])

  def test_intact_run(self):
    self.assertEqual(checkpoints.checkpoints(self.dir), list(enumerate(self.prefixes, 1)))
    self.assertIsNone(checkpoints.readable(self.prefixes[-1], full=True))
    self.assertEqual(checkpoints.latest_readable_checkpoint(self.dir), (3, self.prefixes[-1]))
    self.assertIsNone(checkpoints.unreadable_latest_message(self.dir))
    self.assertIsNone(checkpoints.fall_back(self.dir))

  def test_truncated_latest_names_it_and_the_intact_one(self):
    data_bytes = checkpoint_files.DATA_BYTES
    checkpoint_files.truncate(self.data, data_bytes // 2)
    with self.assertRaises((tf.errors.DataLossError, tf.errors.OutOfRangeError)):
      checkpoint_files.restore(self.prefixes[-1])  # what the Estimator would hit
    np.testing.assert_array_equal(checkpoint_files.restore(self.prefixes[1]),
                                  np.full([3, 5], 3.0))  # intact
    self.assertEqual(checkpoints.readable(self.prefixes[-1]),
                     f"its data files hold {data_bytes // 2} bytes but its index lists "
                     f"{data_bytes} bytes of tensors (a partial write)")
    self.assertEqual(checkpoints.latest_readable_checkpoint(self.dir), (2, self.prefixes[1]))
    with self.assertRaisesRegex(
        checkpoints.UnreadableCheckpointError,
        re.escape(f"The latest checkpoint of --model_dir={self.dir}, step 3 ({self.prefixes[2]}), "
                  "cannot be read: its data files hold")) as cm:
      checkpoints.check_latest(self.dir)
    message = str(cm.exception)
    self.assertIn(f"The checkpoint of step 2 ({self.prefixes[1]}) is intact.", message)
    self.assertIn(f"python -m st_moe.experiments.checkpoints --fall_back {self.dir}", message)
    self.assertIn(f"utils.run.init_checkpoint='{self.prefixes[1]}'", message)

  def test_fall_back_makes_the_intact_one_latest(self):
    checkpoint_files.truncate(self.data, 10)
    done = checkpoints.fall_back(self.dir)
    self.assertRegex(done, r"from its checkpoint of step 2: moved 3 file\(s\)")
    self.assertEqual(tf.train.latest_checkpoint(self.dir), self.prefixes[1])  # what Estimator reads
    self.assertTrue(os.path.exists(self.data + checkpoints.UNREADABLE_SUFFIX))
    self.assertFalse(os.path.exists(self.data))
    np.testing.assert_array_equal(checkpoint_files.restore(tf.train.latest_checkpoint(self.dir)),
                                  np.full([3, 5], 3.0))
    self.assertIsNone(checkpoints.unreadable_latest_message(self.dir))

  def test_missing_data_file(self):
    os.remove(self.data)
    self.assertEqual(checkpoints.readable(self.prefixes[-1]),
                     f"data shard(s) {self.data} missing")
    self.assertEqual(checkpoints.latest_readable_checkpoint(self.dir), (2, self.prefixes[1]))

  def test_missing_index_of_the_checkpoint_the_state_names(self):
    os.remove(self.prefixes[-1] + ".index")
    self.assertEqual(checkpoints.checkpoints(self.dir)[-1], (3, self.prefixes[-1]))
    self.assertEqual(checkpoints.readable(self.prefixes[-1]),
                     f"its index file {self.prefixes[-1]}.index is missing")

  def test_flipped_bytes_only_a_full_read_finds(self):
    with open(self.data, "r+b") as f:
      f.seek(4)
      f.write(b"\xff\xff\xff\xff")
    self.assertIsNone(checkpoints.readable(self.prefixes[-1]))  # sizes are right
    self.assertRegex(checkpoints.readable(self.prefixes[-1], full=True),
                     r"^reading \w+ failed \(\w*Error: .*Checksum does not match")

  def test_nothing_readable(self):
    for prefix in self.prefixes:
      checkpoint_files.truncate(checkpoint_files.data_file(prefix), 0)
    with self.assertRaisesRegex(checkpoints.UnreadableCheckpointError,
                                "No earlier checkpoint there is readable either"):
      checkpoints.fall_back(self.dir)


class BatchSizeTest(absltest.TestCase):
  LENGTHS = {"inputs": 64, "targets": 16}

  def test_sequences_per_batch(self):
    # 6 sequences over batch:4: 4 and 8 are the multiples of 4 around 6.
    self.assertEqual(
        guard.batch_size_problem(("sequences_per_batch", 6), self.LENGTHS, "batch:4",
                                 "batch:batch"),
        "utils.run.batch_size = ('sequences_per_batch', 6) gives 6 sequences per batch, which the "
        "mesh dimension 'batch' of size 4 does not divide (the batch is split over it: "
        "utils.run.mesh_shape = 'batch:4', utils.run.layout_rules = 'batch:batch'). Nearest "
        "working sizes: ('sequences_per_batch', 4) or ('sequences_per_batch', 8), or a "
        "per-replica size such as ('sequences_per_replica', 1).")

  def test_tokens_per_batch(self):
    # 1000 * 64 tokens = 1000 sequences over a "batch" dimension of 32 on a 2-d mesh:
    # 992 = 31 * 32 and 1024 = 32 * 32 sequences, i.e. 63488 and 65536 tokens.
    problem = guard.batch_size_problem(("tokens_per_batch", 64000), self.LENGTHS,
                                       "batch:32,model:4", "batch:batch,heads:model")
    self.assertIn("gives 1000 sequences per batch, which the mesh dimension 'batch' of size 32",
                  problem)
    self.assertIn("('tokens_per_batch', 63488) or ('tokens_per_batch', 65536)", problem)

  def test_tokens_not_a_whole_number_of_sequences(self):
    self.assertEqual(
        guard.batch_size_problem(("tokens_per_batch", 100), self.LENGTHS, "batch:1",
                                 "batch:batch"),
        "utils.run.batch_size = ('tokens_per_batch', 100): 100 tokens is not a whole number of "
        "sequences of the longest sequence length 64 (utils.run.sequence_length = "
        "{'inputs': 64, 'targets': 16}). Nearest working sizes: ('tokens_per_batch', 64) or "
        "('tokens_per_batch', 128).")

  def test_sizes_that_work(self):
    for batch_size, mesh in [(("sequences_per_batch", 8), "batch:4"),
                             (("tokens_per_replica", 128), "batch:3"),
                             (("sequences_per_batch", 6), "model:4")]:  # batch not split
      self.assertIsNone(guard.batch_size_problem(batch_size, self.LENGTHS, mesh,
                                                 "batch:batch,heads:model"), batch_size)

  def test_finalize_hook_raises_before_any_graph(self):
    import mesh_tensorflow.transformer.utils  # pylint: disable=g-import-not-at-top,unused-import
    import st_moe.register  # pylint: disable=g-import-not-at-top,unused-import  (installs the hook)
    self.assertFalse(guard.install_preflight())  # installed once, by st_moe.register
    self.addCleanup(gin.clear_config)
    gin.parse_config(["utils.run.batch_size = ('sequences_per_batch', 6)",
                      "utils.run.mesh_shape = 'batch:4'",
                      "utils.run.layout_rules = 'batch:batch'",
                      "utils.run.sequence_length = {'inputs': 64, 'targets': 16}"])
    with self.assertRaisesRegex(ValueError, r"^utils.run.batch_size = \('sequences_per_batch', 6\)"
                                            r" gives 6 sequences per batch"):
      gin.finalize()


class VocabularyTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self._saved = os.environ.pop(vocab.T5_VOCABULARY_ENV, None)
    self.addCleanup(self._restore_env)

  def _restore_env(self):
    os.environ.pop(vocab.T5_VOCABULARY_ENV, None)
    if self._saved is not None:
      os.environ[vocab.T5_VOCABULARY_ENV] = self._saved

  def test_default_is_t5s_vocabulary(self):
    import t5.data  # pylint: disable=g-import-not-at-top
    self.assertEqual(vocab.default_vocabulary(), t5.data.get_default_vocabulary())
    self.assertEqual(vocab.default_vocabulary().sentencepiece_model_file,
                     "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model")

  def test_offline_default_names_the_file_and_both_ways_out(self):
    # No network here: GCS fails (after its retries, ~45 s).
    with self.assertRaisesRegex(
        vocab.VocabularyNotAvailableError,
        r"^The vocabulary gs://t5-data/vocabs/cc_all.32000/sentencepiece.model cannot be read "
        r"\(\w+Error: ") as cm:
      _ = vocab.default_vocabulary().vocab_size
    self.assertIn("ST_MOE_T5_VOCABULARY=", str(cm.exception))
    self.assertIn("MIXTURE_NAME='st_moe_embedded_span_corruption'", str(cm.exception))

  def test_local_copy_missing(self):
    os.environ[vocab.T5_VOCABULARY_ENV] = "/nonexistent/t5/sentencepiece.model"
    with self.assertRaisesRegex(vocab.VocabularyNotAvailableError,
                                r"^The vocabulary /nonexistent/t5/sentencepiece.model cannot be "
                                r"read \(NotFoundError: "):
      vocab.default_vocabulary().encode("hello")

  def test_local_copy_is_used_and_not_prepared_still_comes(self):
    # A stand-in for a local copy of T5's file: the embedded model (2000 pieces + 100 extra ids).
    os.environ[vocab.T5_VOCABULARY_ENV] = vocab.EMBEDDED_MODEL_PATH
    local = vocab.default_vocabulary()
    self.assertEqual(local.vocab_size, 2100)
    from st_moe import tasks  # pylint: disable=g-import-not-at-top
    names = tasks.add_tasks(local, suffix="_errors_test")
    self.addCleanup(tasks.remove, names)
    import seqio  # pylint: disable=g-import-not-at-top
    task = seqio.get_mixture_or_task("st_moe_c4_span_corruption_errors_test")
    self.assertIs(task.output_features["targets"].vocabulary, local)
    empty = tempfile.mkdtemp(prefix="st_moe_tfds_")
    self.addCleanup(shutil.rmtree, empty, ignore_errors=True)
    seqio.set_tfds_data_dir_override(empty)
    self.addCleanup(seqio.set_tfds_data_dir_override, None)
    with self.assertRaisesRegex(tasks.DatasetNotPreparedError,
                                r"TFDS data set 'c4/en:3.1.0' \(split 'train'\) is not prepared"):
      task.get_dataset({"inputs": 64, "targets": 16}, split="train")


class EntryPointErrorsTest(absltest.TestCase):
  """The messages a user of plain t5_mesh_transformer sees (non-zero exit, before any step)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="st_moe_errors_")
    broken = os.path.join(cls.tmp, "broken")
    cls.prefixes = checkpoint_files.write_checkpoints(broken, steps=2)
    checkpoint_files.truncate(checkpoint_files.data_file(cls.prefixes[-1]), 10)
    empty_tfds = os.path.join(cls.tmp, "tfds")
    os.makedirs(empty_tfds)
    cmd = guard_test.entry_point_command
    env = guard_test.entry_point_env()
    local_vocab = dict(env, **{vocab.T5_VOCABULARY_ENV: vocab.EMBEDDED_MODEL_PATH})
    pretrain = ["utils.run.train_steps = 1", "MIXTURE_NAME = 'st_moe_pretrain'"]
    runs = {
        "batch": (cmd(os.path.join(cls.tmp, "batch"), "utils.run.train_steps = 1",
                      "utils.run.mesh_shape = 'batch:4'",
                      "utils.run.batch_size = ('sequences_per_batch', 6)"), env),
        "checkpoint": (cmd(broken, "utils.run.train_steps = 4"), env),
        "offline_vocabulary": (cmd(os.path.join(cls.tmp, "v1"), *pretrain), env),
        "local_vocabulary": (cmd(os.path.join(cls.tmp, "v2"), *pretrain)
                             + [f"--t5_tfds_data_dir={empty_tfds}"], local_vocab),
    }
    cls.procs = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=e, cwd=cls.tmp)
                 for name, (command, e) in runs.items()}
    cls.results = {}

  @classmethod
  def tearDownClass(cls):
    for proc in cls.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _stderr(self, name):
    if name not in self.results:
      _, err = self.procs[name].communicate(timeout=900)
      self.results[name] = (self.procs[name].returncode, err)
    code, err = self.results[name]
    self.assertNotEqual(code, 0, err[-3000:])
    self.assertNotIn("tf_loss", err)  # no step ran
    return err

  def test_batch_size(self):
    self.assertIn("ValueError: utils.run.batch_size = ('sequences_per_batch', 6) gives 6 sequences"
                  " per batch, which the mesh dimension 'batch' of size 4 does not divide",
                  self._stderr("batch"))

  def test_unreadable_latest_checkpoint(self):
    err = self._stderr("checkpoint")
    self.assertIn(f"UnreadableCheckpointError: The latest checkpoint of --model_dir="
                  f"{os.path.dirname(self.prefixes[0])}, step 2", err)
    self.assertIn(f"The checkpoint of step 1 ({self.prefixes[0]}) is intact.", err)
    self.assertNotIn("DataLossError", err)

  def test_offline_vocabulary(self):
    self.assertRegex(self._stderr("offline_vocabulary"),
                     r"VocabularyNotAvailableError: The vocabulary gs://t5-data/vocabs/"
                     r"cc_all.32000/sentencepiece.model cannot be read .* \(this run: "
                     r"MIXTURE_NAME = 'st_moe_pretrain'\)")

  def test_local_vocabulary_reaches_not_prepared(self):
    err = self._stderr("local_vocabulary")
    self.assertIn("DatasetNotPreparedError: TFDS data set 'c4/en:3.1.0' (split 'train') is not "
                  "prepared", err)
    self.assertNotIn("VocabularyNotAvailableError", err)


if __name__ == "__main__":
  absltest.main()
