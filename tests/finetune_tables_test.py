"""The fine-tuning tables (tools/reproduce.py finetune_*; st_moe/experiments/tables/finetune.py).

BookkeepingTest needs no training: run names, batch sizes, which variables each "parameters
updated" row trains (checked against names spelled out here), the paper's Figure 6 averages
(recomputed from Table 20 against the bars in ST_MOE_TABLES.md) and the direction verdicts.

TablesTest runs each table through the real tool: it pretrains st_moe_tiny (with 1 + 1 layers,
entry_point.ONE_LAYER) for 2 steps, fine-tunes it for 2 steps in two rows of finetune_protocol
(slots kept and reset, side by side) and one row of each other table (finetune_aux: train CF
0.75, no balance loss; finetune_params: MoE only; finetune_dropout: dropout and expert dropout
0.1, which is finetune_protocol's kept row, so it trains nothing anew), decodes each checkpoint,
then reruns finetune_protocol to check that nothing is trained or decoded twice. Which bindings a
dropout row passes is checked without training (BookkeepingTest).
"""
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import entry_point

from st_moe.experiments import finetuning
from st_moe.experiments import jobs
from st_moe.experiments import tables
from st_moe.experiments.tables import common
from st_moe.experiments.tables import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRETRAIN = dict(seeds=1, steps=2, batch_size=4, inputs_length=32, targets_length=8, eval_steps=1,
                checkpoint_every=2)
FINETUNE_STEPS = 2
KEPT = "sparse / 0.001 / 262k / 1 x 136 / kept"
RESET = "sparse / 0.001 / 262k / 1 x 136 / reset"
AUX_ROW = "0.75 / 2 / no"
PARAMS_ROW = "MoE only / /sparse_ffn/"
DROPOUT_ROW = "sparse / 0.1 / 0.1"


class BookkeepingTest(absltest.TestCase):

  def test_run_ids_name_what_differs_from_the_default_cell(self):
    self.assertEqual(finetune.Cell().run_id(0), "ft_sparse_seed0")
    self.assertEqual(finetune.Cell(model="dense").run_id(2), "ft_dense_seed2")
    self.assertEqual(finetune.Cell(learning_rate=1e-4, batch="65k", reset_slots=True).run_id(1),
                     "ft_sparse_lr0.0001_b65k_reset1_seed1")
    self.assertEqual(finetune.Cell(capacity_factor_train=0.75, balance_loss=False).run_id(0),
                     "ft_sparse_cf0.75_aux0_seed0")
    # The same settings asked for by two tables are one run.
    protocol = {c for _, c, _ in finetune.protocol_cells(common.Config())}
    dropout = {c for _, c, _ in finetune.dropout_cells(common.Config())}
    self.assertEqual(protocol & dropout, {finetune.Cell(), finetune.Cell(model="dense")})

  def test_batches_are_the_papers_fractions_of_the_pretraining_batch(self):
    small = common.config_for("finetune_protocol", "small")
    # 65k, 262k and 1M of the paper's 1M-token pretraining batch; small pretrains on 32 sequences.
    self.assertEqual([finetune.batch_sequences(small, b) for b, _ in finetune.BATCHES], [2, 8, 32])
    self.assertEqual(small.seeds, 3)
    self.assertEqual(small.finetune_steps, 300)
    l = common.config_for("finetune_protocol", "l", tpu_flags=("--tpu=x",))
    # ST-MoE-L: 2048 x 512 input tokens; 128 x 512 = 65,536 tokens, as finetune.gin.
    self.assertEqual([finetune.batch_sequences(l, b) for b, _ in finetune.BATCHES],
                     [128, 512, 2048])

  def test_divergence_rule_averages_over_256_sequences(self):
    # The rule judges the mean loss of the steps that see 256 sequences: 128 steps at small's
    # 65k batch (2 sequences), 32 at 262k (8), 8 at 1M (32); one step on a TPU's 2048.
    self.assertEqual([finetuning.loss_smoothing(n) for n in (2, 8, 32, 2048, 3)],
                     [128, 32, 8, 1, 86])

  def test_update_filters_select_the_papers_parameter_groups(self):
    names = {
        "encoder/block_001/sparse_ffn/SparseFFN/router/kernel": {"moe"},
        "decoder/block_003/sparse_ffn/SparseFFN/wi_0/kernel": {"moe"},
        "encoder/block_001/sparse_ffn/rms_norm/scale": {"moe"},
        "encoder/block_000/self_attention/SelfAttention/q": {"non_moe", "attention"},
        "decoder/block_002/enc_dec_attention/EncDecAttention/o": {"non_moe", "attention"},
        "decoder/block_002/enc_dec_attention/rms_norm/scale": {"non_moe", "attention"},
        "encoder/block_000/dense_ffn/DenseReluDense/wo/kernel": {"non_moe", "ffn"},
        "decoder/block_001/extra_dense_ffn_after/DenseReluDense/wi_1/kernel": {"non_moe", "ffn"},
        "shared/embedding": {"non_moe"},
        "decoder/logits/kernel": {"non_moe"},
        "encoder/rms_norm/scale": {"non_moe"},
    }
    for name, want in names.items():
      got = {u for u, regex in finetune.UPDATES.items()
             if regex is not None and re.search(regex, name)}
      self.assertEqual(got, want, name)

  def test_dropout_rows_bind_both_rates_for_training_only(self):
    config = common.config_for("finetune_dropout", "tiny")
    train, decode = finetune.make_job(config, finetune.Cell(dropout=0.0, expert_dropout=0.3), 0)
    self.assertEqual(train.name, "ft_sparse_drop0_edrop0.3_seed0")
    self.assertIn("dropout_rate = 0", train.gin_params)
    self.assertIn("expert_dropout_rate = 0.3", train.gin_params)
    self.assertEqual([p for p in decode.gin_params if "dropout" in p], [])
    dense, _ = finetune.make_job(config, finetune.Cell(model="dense", dropout=0.2), 0)
    self.assertIn("dropout_rate = 0.2", dense.gin_params)
    self.assertEqual([p for p in dense.gin_params if "expert_dropout" in p], [])

  def test_optimizer_slots_are_left_out_and_weights_kept(self):
    from st_moe.experiments import checkpoints  # pylint: disable=g-import-not-at-top
    for name in ("encoder/block_000/dense_ffn/DenseReluDense/wo/kernel_slot_vr",
                 "decoder/logits/kernel_slot_vc", "shared/embedding_slot_v",
                 "encoder/block_001/sparse_ffn/SparseFFN/router/kernel_slot_m"):
      self.assertFalse(checkpoints.not_optimizer_slot(name), name)
    for name in ("encoder/block_000/dense_ffn/DenseReluDense/wo/kernel", "global_step",
                 "shared/embedding"):
      self.assertTrue(checkpoints.not_optimizer_slot(name), name)

  def test_paper_averages_match_figure_6(self):
    config = common.Config()
    rows = finetune.protocol_cells(config)
    results = {cell: [finetune.Result(None, None, {})] for _, cell, _ in rows}
    _, _, averages = finetune.figure_6(rows, results)
    # ST_MOE_TABLES.md, "Figure 6 bars" (each averages 6 runs of Table 20) and the slot averages.
    want = {"dense": [84.73, 84.40, 83.98, 84.03, 84.60, 84.48, 84.61, 84.13],
            "sparse": [84.88, 85.25, 85.92, 85.50, 85.38, 85.17, 85.78, 84.92]}
    keys = ["LR 0.0001", "LR 0.0005", "LR 0.001", "batch 65k", "batch 262k", "batch 1M",
            "slots kept", "slots reset"]
    for model, values in want.items():
      for key, value in zip(keys, values):
        self.assertAlmostEqual(averages[(model, "paper")][key], value, delta=0.006,
                               msg=f"{model} {key}")
      self.assertTrue(all(averages[(model, "ours")][k] is None for k in keys))

  def test_directions(self):
    config = common.Config()
    rows = finetune.protocol_cells(config)
    # Ours made up: sparse best at LR 1e-3 and batch 65k, dense best at 1e-4 and 1M; reset costs 1.
    def made_up(cell):
      value = 50.0
      lr_rank = finetune.LEARNING_RATES.index(cell.learning_rate)
      batch_rank = [b for b, _ in finetune.BATCHES].index(cell.batch)
      value += (lr_rank - batch_rank) * (1 if cell.model == "sparse" else -1)
      return value - (1.0 if cell.reset_slots else 0.0)
    results = {cell: [finetune.Result(made_up(cell), None, {})] for _, cell, _ in rows}
    _, _, averages = finetune.figure_6(rows, results)
    lines = finetune.directions(averages)
    self.assertEqual(lines[0], "- Best learning rate (Figure 6 averages): ours sparse best at "
                     "0.001, dense at 0.0001: sparse's is higher; paper sparse best at 0.001, "
                     "dense at 0.0001: sparse's is higher.")
    self.assertEqual(lines[1], "- Best batch (Figure 6 averages): ours sparse best at 65k, "
                     "dense at 1M: sparse's is smaller; paper sparse best at 65k, dense at 262k: "
                     "sparse's is smaller.")
    self.assertEqual(lines[2], "- sparse: optimizer slots reset: ours reset - kept = -1.00; "
                     "paper reset - kept = -0.86.")
    # With one learning rate measured there is no best one.
    one = [r for r in rows if r[1].learning_rate == 1e-3]
    _, _, averages = finetune.figure_6(one, {cell: results[cell] for _, cell, _ in one})
    self.assertEqual(finetune.directions(averages)[0], "- Best learning rate (Figure 6 "
                     "averages): ours not measured (not every learning rate of both models); "
                     "paper not measured (not every learning rate of both models).")

  def test_score_is_the_accuracy_or_a_mixtures_mean_accuracy(self):
    embedded = finetuning.metrics_by_step(
        {"eval/st_moe_embedded_pydoc_topic/accuracy": ([3, 4], [25.0, 50.0]),
         "eval/st_moe_other/accuracy": ([3], [99.0])}, "st_moe_embedded_pydoc_topic")
    self.assertEqual(embedded, {3: {"accuracy": 25.0}, 4: {"accuracy": 50.0}})
    self.assertEqual(finetune.score(embedded[4]), 50.0)
    # SuperGLUE on a TPU: the mixture's tasks write their own tags; the score is their mean
    # accuracy (CB's F1 is not an accuracy and is left out).
    glue = finetuning.metrics_by_step(
        {"eval/st_moe_super_glue_boolq/accuracy": ([10], [80.0]),
         "eval/st_moe_super_glue_cb/accuracy": ([10], [90.0]),
         "eval/st_moe_super_glue_cb/mean_3class_f1": ([10], [70.0])}, "st_moe_super_glue")
    self.assertEqual(glue[10]["st_moe_super_glue_cb/mean_3class_f1"], 70.0)
    self.assertEqual(finetune.score(glue[10]), 85.0)
    self.assertIsNone(finetune.score({"loss": 1.0}))

  def test_unknown_row_and_bad_settings_name_the_flag(self):
    config = common.config_for("finetune_aux", "tiny", rows=("0.75 / 2 / maybe",))
    with self.assertRaisesRegex(ValueError, r"--rows=.*'0.75 / 2 / maybe' is not a row of "
                                r"finetune_aux; its rows: 0.75 / 2 / no; 0.75 / 2 / yes"):
      tables.validate("finetune_aux", config)
    with self.assertRaisesRegex(ValueError, r"--finetune_steps=0: must be an integer >= 1"):
      tables.validate("finetune_params", common.config_for("finetune_params", finetune_steps=0))


def _tool(out, table, rows):
  flags = [f"--{k}={v}" for k, v in PRETRAIN.items()] + [
      f"--finetune_steps={FINETUNE_STEPS}", "--finetune_checkpoints=2", "--jobs=2"] + [
      f"--gin_param={p}" for p in entry_point.ONE_LAYER]
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "reproduce.py"), table, f"--out={out}"]
      + flags + [f"--rows={r}" for r in rows], capture_output=True, text=True, timeout=1500)


class TablesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = tempfile.mkdtemp(prefix="finetune_tables_test_")
    cls.addClassCleanup(shutil.rmtree, cls.out, ignore_errors=True)  # ~20 MB a run
    cls.protocol = _tool(cls.out, "finetune_protocol", [KEPT, RESET])
    cls.aux = _tool(cls.out, "finetune_aux", [AUX_ROW])
    cls.params = _tool(cls.out, "finetune_params", [PARAMS_ROW])
    cls.dropout = _tool(cls.out, "finetune_dropout", [DROPOUT_ROW])
    cls.again = _tool(cls.out, "finetune_protocol", [KEPT, RESET])

  def _ok(self, proc):
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])

  def _csv(self, table):
    with open(os.path.join(self.out, table, f"{table}.csv")) as f:
      return list(csv.reader(f))

  def test_protocol_table(self):
    self._ok(self.protocol)
    header, *rows = self._csv("finetune_protocol")
    self.assertEqual([r[:5] for r in rows], [KEPT.split(" / "), RESET.split(" / ")])
    for row in rows:
      row = dict(zip(header, row))
      for key in ("peak score (ours)", "last score (ours)"):
        self.assertTrue(0.0 <= float(row[key]) <= 100.0, row)  # one seed: the value alone
      self.assertGreaterEqual(float(row["peak score (ours)"]), float(row["last score (ours)"]))
      self.assertEqual(row["stopped runs"], "none")
    self.assertEqual([dict(zip(header, r))["paper (SuperGLUE)"] for r in rows], ["86.2", "85.2"])
    folder = os.path.join(self.out, "finetune_protocol")
    for png in ("finetune_protocol.png", "figure_6.png", "finetune_protocol_grid.png"):
      with open(os.path.join(folder, png), "rb") as f:
        self.assertEqual(f.read(8), PNG_MAGIC)
    with open(os.path.join(folder, "finetune_protocol.md")) as f:
      md = f.read()
    self.assertIn("## Figure 6: averages per setting", md)
    self.assertIn("- sparse: optimizer slots reset: ours reset - kept = ", md)
    with open(os.path.join(folder, "finetune_protocol_commands.md")) as f:
      commands = f.read()
    kept, reset = commands.split("## ft_sparse_reset1_seed0")
    self.assertIn("--gin_file=finetune.gin", kept)
    self.assertIn("utils.run.init_checkpoint", kept)
    # Resumed, it would skip the batches it trained on since the pretrained step-2 checkpoint.
    self.assertIn("utils.run.skip_seen_data = True", kept)
    self.assertIn("utils.run.seen_data_init_step = 2", kept)
    self.assertIn("--gin_file=eval.gin", kept)  # the decoding's command line
    self.assertNotIn("not_optimizer_slot", kept)
    self.assertIn("@st_moe.not_optimizer_slot", reset)
    self.assertNotIn(self.out, commands)

  def test_every_fine_tuning_checkpoint_is_decoded(self):
    self._ok(self.protocol)
    run = os.path.join(self.out, "runs", "ft_sparse_seed0")
    # Pretrained to step 2; fine-tuned 2 steps with a checkpoint every step: steps 3 and 4.
    self.assertRegex(self.protocol.stdout, r"\[ft_sparse_seed0\] training steps 3\.\.4 from "
                     r"\S+/runs/default_cf1\.25_seed0/model\.ckpt-2")
    decoded = finetuning.decode_metrics_by_step(run, finetune.FINETUNE_TASKS["tiny"])
    self.assertContainsSubset({3, 4}, set(decoded))
    self.assertEqual(sorted(jobs.read_json(os.path.join(run, "decode_all.json"))["by_step"]),
                     ["3", "4"])
    for step in (3, 4):
      self.assertBetween(decoded[step]["accuracy"], 0.0, 100.0)

  def test_reset_run_starts_its_slots_from_zero_and_kept_run_restores_them(self):
    self._ok(self.protocol)
    # mesh_tensorflow logs the graph's variables it did not restore from the init checkpoint.
    missing = {}
    for run in ("ft_sparse_seed0", "ft_sparse_reset1_seed0"):
      logs = os.path.join(self.out, "runs", run, "logs")
      (log,) = [f for f in os.listdir(logs) if f.startswith(run)]
      with open(os.path.join(logs, log)) as f:
        text = f.read()
      section = text.split("Variables in graph but not in", 1)[1].split("WARNING", 1)[0]
      missing[run] = set(re.findall(r"[\w/]+_slot_\w+", section))
    self.assertEqual(missing["ft_sparse_seed0"], set())
    self.assertIn("encoder/block_000/sparse_ffn/SparseFFN/router/kernel_slot_v",
                  missing["ft_sparse_reset1_seed0"])

  def test_aux_table_reports_tokens_dropped(self):
    self._ok(self.aux)
    header, row = self._csv("finetune_aux")
    row = dict(zip(header, row))
    self.assertEqual((row["train CF"], row["eval CF"], row["balance loss"]), ("0.75", "2", "no"))
    # A percentage (the mean over the last quarter of fine-tuning, over the sparse layers).
    self.assertBetween(float(row["% tokens dropped (train)"]), 0.0, 100.0)
    self.assertEqual((row["paper (SuperGLUE)"], row["% tokens dropped (paper)"]), ("85.7", "15.6"))
    with open(os.path.join(self.out, "finetune_aux", "finetune_aux_commands.md")) as f:
      commands = f.read()
    self.assertIn("balance_loss_coef = 0.0", commands)
    self.assertIn("capacity_factor_train = 0.75", commands)

  def test_params_row_trains_only_the_sparse_layers(self):
    self._ok(self.params)
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    header, row = self._csv("finetune_params")
    self.assertEqual(row[:2], ["MoE only", "/sparse_ffn/"])
    self.assertEqual(dict(zip(header, row))["paper (in words)"], "a drastic drop")
    before = tf.train.load_checkpoint(
        os.path.join(self.out, "runs", "default_cf1.25_seed0", "model.ckpt-2"))
    after = tf.train.load_checkpoint(os.path.join(self.out, "runs", "ft_sparse_update-moe_seed0"))
    changed = {n for n in before.get_variable_to_shape_map()
               if "_slot_" not in n and n != "global_step"
               and not np.array_equal(before.get_tensor(n), after.get_tensor(n))}
    self.assertIn("encoder/block_000/sparse_ffn/SparseFFN/router/kernel", changed)
    self.assertIn("decoder/block_000/sparse_ffn/SparseFFN/wo/kernel", changed)
    self.assertEqual({n for n in changed if "/sparse_ffn/" not in n}, set())

  def test_dropout_row_is_the_protocol_run(self):
    self._ok(self.dropout)
    header, row = self._csv("finetune_dropout")
    self.assertEqual(row[:3], ["sparse", "0.1", "0.1"])
    self.assertBetween(float(dict(zip(header, row))["peak score (ours)"]), 0.0, 100.0)
    self.assertIn("[ft_sparse_seed0] already trained", self.dropout.stdout)
    self.assertNotIn("training steps", self.dropout.stdout)
    with open(os.path.join(self.out, "finetune_dropout", "finetune_dropout_commands.md")) as f:
      commands = f.read().replace('"', "'")
    self.assertIn("## ft_sparse_seed0", commands)
    self.assertIn("dropout_rate = 0.1'", commands)
    self.assertIn("expert_dropout_rate = 0.1'", commands)

  def test_rerun_trains_and_decodes_nothing_again(self):
    self._ok(self.again)
    self.assertNotIn("training steps", self.again.stdout)
    self.assertNotIn("evaluating step", self.again.stdout)
    self.assertIn("[ft_sparse_seed0] already trained", self.again.stdout)
    self.assertIn("[ft_sparse_reset1_seed0] already trained", self.again.stdout)


if __name__ == "__main__":
  absltest.main()
