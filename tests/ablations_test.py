"""The ablation tables' runs (Tables 8, 16, 17) build the models they claim, at scale tiny.

Each row's run is parsed and its mtf graph built (st_moe.analysis.model_graph, nothing lowered or
trained); the parameters and FLOPs it adds are checked against a hand count from st_moe_tiny.gin
(d_model 32, d_ff 64, 4 experts, 4 + 4 layers, 2 sparse per stack, extra dense FFN after) and
dense_tiny.gin (d_ff 128). A GEGLU FFN holds 3 x d_model x d_ff weights and its pre-norm d_model
scales. One table (expert_bias) is trained and written end to end in reproduce_test.py.
RowsAndArchivedRunsTest: --rows and the check for archived runs, without training.
"""
import dataclasses
import os
import tempfile
from unittest import mock

from absl.testing import absltest

from st_moe.analysis import model_graph
from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments import tables
from st_moe.experiments.tables import ablations
from st_moe.experiments.tables import common

D_MODEL, D_FF, D_FF_DENSE, EXPERTS, LAYERS, SPARSE = 32, 64, 128, 4, 4, 2
SEQUENCE = {"inputs": 32, "targets": 8}
# The distinct models of the three tables (the other rows differ from these only in a capacity
# factor, which changes no variable); building each takes a few seconds.
BUILT = {"default_cf1.25_seed0", "top1_cf1.25_seed0", "top3_cf2_seed0", "extra_ffn_none_seed0",
         "extra_ffn_before_seed0", "extra_ffn_random_seed0", "dense_seed0",
         "dense_extra_ffn_seed0", "additive_bias_seed0", "multiplicative_bias_seed0"}


def ffn(d_ff):
  return 3 * D_MODEL * d_ff + D_MODEL  # GEGLU weights + its pre-norm scale


class AblationRunsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = common.config_for("top_k", "tiny", out="/tmp/ablations_test_unused", seeds=1,
                                   batch_size=2, inputs_length=32, targets_length=8)
    cls.counts = {}
    for name in ablations.TABLES:
      for row in ablations.TABLES[name][0](cls.config):
        run = row.run(cls.config, 0)
        if run.name in BUILT and run.name not in cls.counts:
          model_graph.parse_gin(run.job.gin_files, run.job.model_params())
          graph = model_graph.build(vocab_size=2100, batch_size=2, sequence_length=SEQUENCE,
                                    mesh_shape="", layout_rules="")
          cls.counts[run.name] = (model_graph.count(graph), set(graph.variables))

  def params(self, run_id):
    return self.counts[run_id][0].total_params

  def test_rows_share_the_other_tables_runs(self):
    rows = {r.label: r.run(self.config, 0).name for r in ablations.top_k_rows(self.config)}
    self.assertEqual(rows["Dense"], "dense_seed0")  # sparse_vs_dense's
    self.assertEqual(rows["top-2 train 1.25 eval 2"], "default_cf1.25_seed0")  # capacity's
    self.assertEqual(rows["top-2 train 1.25 eval 1.25"], "default_cf1.25_seed0")
    self.assertEqual(rows["top-1 train 1.25 eval 2"], "top1_cf1.25_seed0")
    own = [r for r in ablations.dense_ffn_rows(self.config) if "own" in r.label]
    self.assertLen(own, 1)  # st_moe_tiny has its extra dense FFN after each sparse layer
    self.assertIn("after each sparse layer", own[0].label)
    self.assertEqual(own[0].run(self.config, 0).name, "default_cf1.25_seed0")

  def test_top_k_scales_expert_flops_not_parameters(self):
    two = self.counts["default_cf1.25_seed0"][0]
    for k in (1, 3):
      counts = self.counts[f"top{k}_cf{2.0 if k == 3 else 1.25:g}_seed0"][0]
      self.assertEqual(counts.total_params, two.total_params)
      self.assertEqual(counts.num_selected_experts, k)
      self.assertEqual(counts.flops["experts"] * 2, two.flops["experts"] * k)

  def test_extra_dense_ffn_placements(self):
    own = self.params("default_cf1.25_seed0")  # "after": one extra FFN per sparse layer
    none = self.params("extra_ffn_none_seed0")
    self.assertEqual(own - none, 2 * SPARSE * ffn(D_FF))
    self.assertEqual(self.params("extra_ffn_before_seed0"), own)
    self.assertEqual(self.params("extra_ffn_random_seed0"), own)
    names = self.counts["extra_ffn_random_seed0"][1]
    self.assertTrue(any("extra_dense_ffn_after_" in n for n in names), sorted(names)[:5])
    before = self.counts["extra_ffn_before_seed0"][1]
    self.assertTrue(any("/extra_dense_ffn_before/" in n for n in before))

  def test_dense_with_extra_ffns(self):
    self.assertEqual(self.params("dense_extra_ffn_seed0") - self.params("dense_seed0"),
                     2 * LAYERS * ffn(D_FF_DENSE))

  def test_expert_biases(self):
    base = self.params("default_cf1.25_seed0")
    for which in ("additive_bias", "multiplicative_bias"):
      names = self.counts[f"{which}_seed0"][1]
      self.assertEqual(self.params(f"{which}_seed0") - base, 2 * SPARSE * EXPERTS * D_FF, which)
      self.assertTrue(any(n.endswith("/" + which) for n in names), which)


def _no_training(*args, **kwargs):
  raise AssertionError(f"training or evaluation started: {args[0].name}")


class RowsAndArchivedRunsTest(absltest.TestCase):
  """--rows runs a part of a table (with the baseline rows it is compared with); a finished run
  that lost its checkpoints (restored from the archive) and misses an evaluation stops the table
  before anything trains, not after the runs before it in the table have trained."""

  def test_rows_bring_their_baselines(self):
    config = common.config_for("top_k", "tiny", rows=("top-3 / 2 / 3", "top-1 / 0.75 / 2"))
    self.assertEqual([r.label for r in ablations.selected("top_k", config)],
                     ["Dense", "top-1 train 0.75 eval 2", "top-3 train 2 eval 3"])
    # Table 16: an extra FFN before each sparse layer is compared with the sparse model without.
    config = common.config_for("dense_ffn", "tiny",
                               rows=("Sparse + extra FFN before each sparse layer",))
    self.assertEqual([r.label for r in ablations.selected("dense_ffn", config)],
                     ["Sparse (baseline): no extra dense FFN",
                      "Sparse + extra FFN before each sparse layer"])

  def test_a_row_that_is_not_one_is_named_with_the_rows_there_are(self):
    config = common.config_for("top_k", "tiny", rows=("top-3 / 2.0 / 3",))
    with self.assertRaisesRegex(ValueError, r"--rows='top-3 / 2.0 / 3': 'top-3 / 2.0 / 3' is not "
                                r"a row of top_k; its rows: dense / - / -; top-1 / 0.75 / 0.75; "):
      tables.validate("top_k", config)
    with self.assertRaisesRegex(ValueError, r"--rows='x': capacity runs all its rows; --rows "
                                r"selects rows of top_k, dense_ffn, expert_bias, finetune_"):
      tables.validate("capacity", common.config_for("capacity", "tiny", rows=("x",)))

  def test_an_archived_run_missing_an_evaluation_stops_the_table_before_training(self):
    out = tempfile.mkdtemp(prefix="ablations_test_")
    config = common.config_for("expert_bias", "tiny", out=out, seeds=1, steps=6)
    # The sparse baseline's run as tools/archive_runs.py restores it: finished at step 6, its
    # `checkpoint` index naming model.ckpt-6, whose files are not there; no eval_cf2.json.
    sparse = os.path.join(out, "runs", "default_cf1.25_seed0")
    os.makedirs(sparse)
    jobs.write_json(os.path.join(sparse, "train_done.json"), {"train_steps": 6, "status": "done"})
    with open(os.path.join(sparse, "checkpoint"), "w") as f:
      f.write('model_checkpoint_path: "model.ckpt-6"\n')
    with mock.patch.object(jobs, "train", _no_training), \
         mock.patch.object(runner, "run", _no_training):
      with self.assertRaisesRegex(
          jobs.MissingCheckpointError,
          r"^1 evaluation\(s\) cannot run, checked before training anything:\n"
          r"\[default_cf1.25_seed0\] evaluation eval_cf2 \(capacity_factor_eval = 2.0 "
          r"st_moe.SparseFFN.capacity_factor_eval = 2.0\) is not cached and needs the step-6 "
          r"checkpoint of .*default_cf1.25_seed0, which cannot be read: .*\n"
          r"Or leave their rows out: --rows names the rows to run \(as in expert_bias.md, e.g. "
          r"--rows='Sparse \+ multiplicative bias \(ones\)'\)\.$"):
        ablations.table("expert_bias", config)
      # Without the rows compared with the sparse baseline, the table goes on to train its dense
      # row (the mocked training raises).
      with self.assertRaisesRegex(AssertionError, r"training or evaluation started: dense_seed0"):
        ablations.table("expert_bias", dataclasses.replace(config, rows=("Dense baseline",)))
      # With its evaluation cached (the key jobs.evaluate writes), the run is not in the way.
      jobs.write_json(os.path.join(sparse, "eval_cf2.json"), {
          "step": 6, "eval_steps": config.eval_steps,
          "gin_params": ["mesh_eval_dataset_fn.seed = 0", "capacity_factor_eval = 2.0",
                         "st_moe.SparseFFN.capacity_factor_eval = 2.0"],
          "eval_gin_files": ["perplexity_eval.gin"], "neg_log_perplexity": -3.0})
      with self.assertRaisesRegex(AssertionError, r"training or evaluation started: dense_seed0"):
        ablations.table("expert_bias", config)


class TpuScaleRowsTest(absltest.TestCase):
  """At --scale=l the same rows name ST-MoE-L's files, the TPU layout and the user's TPU flags."""

  def test_rows_at_scale_l(self):
    tpu = ("--tpu=my-tpu", "--gcp_project=p", "--tpu_zone=z")
    config = common.config_for("expert_bias", "l", out="gs://bucket/repro", tpu_flags=tpu)
    common.validate_common(config)
    jobs_by_label = {r.label: r.run(config, 0).job for r in ablations.expert_bias_rows(config)}
    dense = jobs_by_label["Dense baseline"]
    self.assertEqual(dense.gin_files[:2], ["dense_l.gin", "tpu_v3_32_dp32.gin"])
    bias = jobs_by_label["Sparse + multiplicative bias (ones)"]
    self.assertEqual(bias.gin_files[:2], ["st_moe_l.gin", "tpu_v3_32_dp32.gin"])
    self.assertIn("st_moe.SparseFFN.multiplicative_bias = True", bias.gin_params)
    self.assertEqual(bias.model_dir, "gs://bucket/repro/runs/multiplicative_bias_seed0")
    self.assertEqual(tuple(bias.extra_flags), tpu)
    self.assertEqual(config.task, "st_moe_pretrain")
    # ST-MoE-L keeps its extra dense FFN after each sparse layer: that row is the model's own run.
    own = [r for r in ablations.dense_ffn_rows(config) if "own" in r.label]
    self.assertEqual([r.run(config, 0).name for r in own], ["default_cf1.25_seed0"])
    self.assertIn("after each sparse layer", own[0].label)


if __name__ == "__main__":
  absltest.main()
