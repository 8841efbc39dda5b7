"""tools/reproduce.py: each table at a very small setting, through the real tool and library.

The tables run for real through t5_mesh_transformer (1 seed, 6 steps, tiny shapes); the entropy
table reuses the capacity table's run and its routing trace, as the tool does at full size.
Bookkeeping without training (skipping, stable and diverged rows) is in jobs_test.py.
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
import numpy as np
from st_moe.analysis import routing_stats

from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments import tables
from st_moe.experiments.tables import common
from st_moe.experiments.tables import entropy
from st_moe.experiments.tables import sparse_vs_dense
from st_moe.experiments.tables import stability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = dict(seeds=1, steps=6, batch_size=4, inputs_length=32, targets_length=8, eval_steps=1,
             checkpoint_every=6, trace_tokens=64)
# The tables' runs build their models with 1 + 1 layers (one sparse layer per stack), ResumedRunTest
# with 2 + 2 (the numbers its docstring quotes were measured so): tests/entry_point.py.
LAYERS = entry_point.ONE_LAYER
# The stability run at a learning rate 100x below the study's: 6 steps of it cannot diverge.
CALM = "learning_rate_schedules.constant_learning_rate.learning_rate = 0.01"
# st_moe_tiny has 4 experts. At eval capacity factor 4 an expert holds min(S, int(S * 4 / 4)) = S
# slots per routing group of S tokens, so no token can be dropped: the eval column reads 0 there.
CF_NOTHING_DROPPED = 4.0


def _small_flags():
  return [f"--{k}={v}" for k, v in SMALL.items()] + [f"--gin_param={p}" for p in LAYERS]


class TablesTest(absltest.TestCase):
  """One small run of every table; the outputs are checked for shape and content."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = tempfile.mkdtemp(prefix="reproduce_test_")
    cls.addClassCleanup(shutil.rmtree, cls.out, ignore_errors=True)  # ~20 MB a run
    cls.stability_proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "reproduce.py"), "stability",
         "--variants=remove_rmsnorm_scale", f"--out={cls.out}", f"--gin_param={CALM}"]
        + _small_flags(), capture_output=True, text=True, timeout=1500)
    config = common.Config(out=cls.out, capacity_factors_train=(1.25,),
                           capacity_factors_eval=(2.0, CF_NOTHING_DROPPED), gin_params=LAYERS,
                           **SMALL)
    cls.capacity_lines, cls.entropy_lines = [], []
    cls.capacity_md = tables.run_table("capacity", config, show=cls.capacity_lines.append)
    cls.entropy_md = tables.run_table("entropy", config, show=cls.entropy_lines.append)
    cls.svd_lines = []
    cls.svd_md = tables.run_table("sparse_vs_dense", config, show=cls.svd_lines.append)
    # Table 17: reuses the two runs above (dense twin, default model); trains its two bias runs
    # side by side.
    cls.bias_lines = []
    bias_config = common.Config(out=cls.out, jobs=2, gin_params=LAYERS, **SMALL)
    cls.bias_md = tables.run_table("expert_bias", bias_config, show=cls.bias_lines.append)

  def _csv(self, table):
    with open(os.path.join(self.out, table, f"{table}.csv")) as f:
      rows = list(csv.reader(f))
    self.assertGreater(len(rows), 1)
    self.assertTrue(all(len(r) == len(rows[0]) for r in rows), rows)
    return rows

  def _check_md_png(self, table, png):
    with open(os.path.join(self.out, table, f"{table}.md")) as f:
      md = f.read()
    blocks = [b.splitlines() for b in re.split(r"\n(?!\|)[^\n]*", "\n" + md)]
    tables = [[l for l in b if l.startswith("|")] for b in blocks]
    tables = [t for t in tables if t]
    self.assertNotEmpty(tables)
    for lines in tables:  # each markdown table: a header, its rule and rows, all as wide
      self.assertGreaterEqual(len(lines), 3, md)
      self.assertEqual(len({l.count("|") for l in lines}), 1, md)
    with open(os.path.join(self.out, table, png), "rb") as f:
      self.assertEqual(f.read(8), PNG_MAGIC)
    with open(os.path.join(self.out, table, f"{table}_commands.md")) as f:
      commands = f.read()
    self.assertIn("t5_mesh_transformer", commands)
    self.assertIn("--gin_file=st_moe_tiny.gin", commands)
    self.assertIn('--model_dir="$OUT"/runs/', commands)  # portable: no path of this machine
    self.assertNotIn(self.out, commands)
    self.assertNotIn(REPO + os.sep, commands)
    self.assertNotIn("tools/", commands)  # no tool is run by its path
    return commands

  def test_stability_table(self):
    self.assertEqual(self.stability_proc.returncode, 0, self.stability_proc.stdout[-3000:]
                     + self.stability_proc.stderr[-3000:])
    rows = self._csv("stability")
    self.assertEqual(rows[0], stability.HEADERS)
    self.assertEqual(len(rows), 2)
    row = dict(zip(rows[0], rows[1]))
    self.assertEqual(row["variant"], "remove_rmsnorm_scale")
    self.assertEqual(row["stable runs"], "1/1")
    self.assertEqual(row["diverged runs"], "none")
    quality = float(row["quality (ours)"])  # one seed: the value alone, no "+- 0.000"
    self.assertTrue(-20.0 < quality < 0.0, row)
    self.assertEqual((row["stable runs (paper)"], row["quality (paper)"]),
                     stability.VARIANTS["remove_rmsnorm_scale"][2])
    commands = self._check_md_png("stability", "stability_curves.png")
    self.assertIn("--gin_file=stability_tiny.gin", commands)
    self.assertIn(CALM.replace(" ", ""), commands.replace(" ", ""))  # the user's --gin_param

  def test_rmsnorm_scale_variant_trains_without_scale_parameters(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    model_dir = os.path.join(self.out, "runs", "stability_remove_rmsnorm_scale_seed0")
    names = [n for n, _ in tf.train.list_variables(model_dir)]
    self.assertTrue(any("wi_1" in n for n in names), names[:10])  # GEGLU kept
    self.assertEqual([n for n in names if n.endswith("/scale")], [])
    default = [n for n, _ in tf.train.list_variables(
        os.path.join(self.out, "runs", "default_cf1.25_seed0"))]
    self.assertTrue(any(n.endswith("rms_norm/scale") for n in default))

  def test_capacity_table(self):
    rows = self._csv("capacity")
    self.assertLen(rows, 3)
    cells = {(r[0], r[1]): dict(zip(rows[0], r)) for r in rows[1:]}
    self.assertEqual(sorted(cells), [("1.25", "2.0"), ("1.25", "4.0")])
    for row in cells.values():
      self.assertTrue(-20.0 < float(row["quality"]) < 0.0, row)
      self.assertBetween(float(row["dropped % (train)"]), 0.0, 100.0)
      self.assertGreater(float(row["step time (s)"]), 0.0)
      self.assertEqual(row["stable runs"], "1/1")
    self.assertEqual(float(cells[("1.25", "4.0")]["dropped % (eval)"]), 0.0)
    self.assertBetween(float(cells[("1.25", "2.0")]["dropped % (eval)"]), 0.0, 100.0)
    self.assertEqual(cells[("1.25", "2.0")]["step time ST-MoE-L (paper, s)"], "2.397")
    self._check_md_png("capacity", "capacity.png")

  def test_sparse_vs_dense_table_trains_only_the_dense_twin_anew(self):
    # The sparse run is the capacity table's (same settings); only dense_seed0 trains here.
    self.assertEqual([l.split("]")[0] for l in self.svd_lines if "training steps" in l],
                     ["[dense_seed0"])
    rows = self._csv("sparse_vs_dense")
    self.assertEqual(rows[0], sparse_vs_dense.HEADERS)
    cells = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    self.assertEqual(sorted(cells), ["dense", "sparse"])
    self.assertEqual(cells["sparse"]["gin file"], "`st_moe_tiny.gin`")
    self.assertEqual(cells["dense"]["gin file"], "`dense_tiny.gin`")
    for model, row in cells.items():
      self.assertTrue(-20.0 < float(row["validation NLP (ours)"]) < 0.0, row)
      self.assertEqual(row["stable runs"], "1/1")
      self.assertEqual(float(row["NLP (paper, L scale)"]), sparse_vs_dense.PAPER[model])
    capacity_quality = float(dict(zip(*self._csv("capacity")[:2]))["quality"])
    # The capacity table rounds to 3 digits: up to 0.0005 apart.
    self.assertAlmostEqual(float(cells["sparse"]["validation NLP (ours)"]), capacity_quality,
                           delta=0.0005 + 1e-9)
    with open(self.svd_md) as f:
      self.assertIn("spread unknown (one seed per model)", f.read())
    commands = self._check_md_png("sparse_vs_dense", "sparse_vs_dense.png")
    self.assertIn("--gin_file=dense_tiny.gin", commands)

  def test_expert_bias_table(self):
    trained = [l for l in self.bias_lines if "training steps" in l]
    self.assertLen(trained, 2, self.bias_lines)  # only the two bias runs are new
    self.assertTrue(all("bias_seed0" in l for l in trained), trained)
    rows = self._csv("expert_bias")
    header, body = rows[0], rows[1:]
    self.assertEqual(header[:5], ["model", "NLP (ours)", "NLP (paper)",
                                  "gain over baseline (ours)", "gain over baseline (paper)"])
    cells = {r[0]: dict(zip(header, r)) for r in body}
    self.assertEqual(list(cells), ["Dense baseline", "Sparse baseline",
                                   "Sparse + additive bias (zeros)",
                                   "Sparse + multiplicative bias (ones)"])
    # The paper's Table 17 and its gains over the sparse baseline (-1.369).
    self.assertEqual(float(cells["Sparse + additive bias (zeros)"]["NLP (paper)"]), -1.371)
    self.assertAlmostEqual(
        float(cells["Sparse + multiplicative bias (ones)"]["gain over baseline (paper)"]), 0.008)
    # Ours: the sparse baseline row is the capacity table's run, evaluated at eval CF 2.0.
    capacity_rows = self._csv("capacity")
    at_2 = [r for r in capacity_rows[1:] if r[0] == "1.25" and r[1] == "2.0"][0]
    self.assertEqual(cells["Sparse baseline"]["NLP (ours)"], at_2[2])
    gain = float(cells["Sparse + additive bias (zeros)"]["gain over baseline (ours)"])
    self.assertAlmostEqual(gain, float(cells["Sparse + additive bias (zeros)"]["NLP (ours)"])
                           - float(at_2[2]), delta=0.0011)  # both NLPs rounded to 3 digits
    self.assertEqual(cells["Sparse baseline"]["effect / seed spread (ours)"], "")  # one seed
    self.assertEqual(cells["Sparse + additive bias (zeros)"]["stable runs"], "1/1")
    commands = self._check_md_png("expert_bias", "expert_bias.png")
    self.assertIn("st_moe.SparseFFN.additive_bias = True", commands)

  def test_entropy_table_reuses_capacity_run_and_trace(self):
    self.assertLen([l for l in self.capacity_lines if "training steps" in l], 1)
    self.assertLen([l for l in self.capacity_lines if "tracing routing" in l], 1)
    self.assertEqual([l for l in self.entropy_lines if "training steps" in l or "tracing" in l],
                     [])
    rows = self._csv("entropy")
    header, body = rows[0], rows[1:]
    self.assertEqual(header[:5], ["sparse layer", "encoder sentinels (ours)",
                                  "encoder all tokens (ours)", "decoder sentinels (ours)",
                                  "decoder all tokens (ours)"])
    bound = body[-1]
    self.assertEqual(bound[0], "uniform bound (ln E)")
    self.assertAlmostEqual(float(bound[1]), np.log(4), places=3)
    self.assertAlmostEqual(float(bound[5]), np.log(32), places=2)
    ours = [float(r[c]) for r in body[:-1] for c in (1, 2, 3, 4) if r[c]]
    self.assertLen(ours, 4)  # 1 sparse layer per stack (LAYERS), sentinels and all tokens
    for value in ours:
      self.assertBetween(value, 0.0, np.log(4) + 1e-6)
    traced = jobs.read_json(os.path.join(self.out, "runs", "default_cf1.25_seed0", "trace_cf2",
                                         "routing.json"))
    self.assertGreater(traced[0]["num_sentinels"], 0)
    self.assertLess(traced[0]["num_sentinels"], traced[0]["num_tokens"])
    # Table 14's column is the sentinel entropy, the next one all tokens'.
    self.assertEqual(float(body[0][1]), round(traced[0]["sentinel_router_entropy"], 3))
    self.assertEqual(float(body[0][2]), round(traced[0]["router_entropy"], 3))
    # The paper's first encoder layer over ln 32: 2.2 / 3.466 = 0.63; its decoder 3.4 / 3.466 = 0.98.
    self.assertTrue(body[0][7].endswith("/ 0.63"), body[0])
    self.assertTrue(body[0][8].endswith("/ 0.98"), body[0])
    with open(os.path.join(self.out, "entropy", "entropy.md")) as f:
      md = f.read()
    self.assertIn("## Table 13: encoder expert specialisation", md)
    # One row per paper category, with the layers the paper's Table 13 names.
    for category, paper_layers in (("sentinel", "1, 4, 6"), ("punctuation", "2, 6"),
                                   ("conjunction or article", "3, 6"), ("verb", "1"),
                                   ("proper name", "1"), ("number", "1")):
      self.assertRegex(md, rf"\| {category} \|[^\n]*\| {paper_layers} \|")
    self.assertTrue(os.path.getsize(os.path.join(self.out, "entropy", "specialisation.png")) > 0)
    self._check_md_png("entropy", "entropy.png")

  def test_rerun_skips_finished_runs(self):
    lines = []
    config = common.Config(out=self.out, capacity_factors_train=(1.25,),
                           capacity_factors_eval=(2.0, CF_NOTHING_DROPPED), gin_params=LAYERS,
                           **SMALL)
    tables.run_table("capacity", config, show=lines.append)
    self.assertTrue(any("already trained" in l for l in lines), lines)
    self.assertEqual([l for l in lines if "training steps" in l or "evaluating" in l
                      or "tracing" in l], [])


class SettingsTest(absltest.TestCase):

  def test_bad_settings_are_named(self):
    for table, changes, needle in (
        ("table", {}, "TABLE='table'"),
        ("stability", {"seeds": 0}, "--seeds=0"),
        ("stability", {"variants": ("baseline", "typo")}, "--variants='typo'"),
        ("capacity", {"capacity_factors_train": (1.0, -2.0)}, "--capacity_factors_train"),
        ("stability", {"scale": "xl"}, "--scale='xl'"),
        ("stability", {"scale": "l"}, "--tpu"),
        ("capacity", {"jobs": 0}, "--jobs=0"),
        ("capacity", {"targets_length": 1}, "--targets_length=1"),
        ("stability", {"baseline_seeds": 0}, "--baseline_seeds=0"),
    ):
      with self.assertRaisesRegex(ValueError, needle.replace("(", r"\(").replace("[", r"\[")):
        tables.validate(table, common.Config(**changes))

  def test_tool_names_a_bad_flag_before_running(self):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce.py"),
                           "capacity", "--capacity_factors_eval=1.0,x"],
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 1)
    self.assertIn("--capacity_factors_eval=1.0,x: must be numbers", proc.stderr)

  def test_baseline_trains_twice_the_seeds_as_in_the_paper(self):
    # Table 3: the baseline on 6 seeds, every variant on 3.
    config = common.Config(seeds=3, variants=("baseline", "router_z_loss"))
    runs = stability.plan(config)
    self.assertEqual(sorted(runs), [("baseline", s) for s in range(6)]
                     + [("router_z_loss", s) for s in range(3)])
    self.assertEqual(runs[("baseline", 5)].name, "stability_baseline_seed5")
    self.assertIn("st_moe.seeded_train_dataset_fn.seed = 5",
                  runs[("baseline", 5)].job.gin_params)
    explicit = stability.plan(common.Config(seeds=3, baseline_seeds=4, variants=("baseline",)))
    self.assertLen(explicit, 4)

  def test_every_paper_row_has_a_variant(self):
    self.assertLen(stability.VARIANTS, 7)
    for name, (_, bindings, _) in stability.VARIANTS.items():
      z = [b for b in bindings if b.startswith("router_z_loss_coef")]
      self.assertEqual(z, ["router_z_loss_coef = 0.001" if name == "router_z_loss"
                           else "router_z_loss_coef = 0.0"])


class SparseVsDenseArithmeticTest(absltest.TestCase):

  def test_pooled_std_by_hand(self):
    # Means 2 and 4; squares about them (1 + 1) + (4 + 0 + 4) = 10 over 1 + 2 = 3 dof.
    self.assertAlmostEqual(sparse_vs_dense.pooled_std([[1.0, 3.0], [2.0, 4.0, 6.0]]),
                           (10 / 3) ** 0.5)
    self.assertAlmostEqual(sparse_vs_dense.pooled_std([[1.0, 3.0, None], [5.0]]), 2 ** 0.5)
    self.assertIsNone(sparse_vs_dense.pooled_std([[1.0], [2.0]]))

  def test_verdict_against_three_spreads(self):
    self.assertIn("beyond 3 standard deviations", sparse_vs_dense.verdict(0.10, 0.02))
    self.assertIn("5.0 x the seed spread", sparse_vs_dense.verdict(0.10, 0.02))
    self.assertIn("under 3 standard deviations", sparse_vs_dense.verdict(0.05, 0.02))
    self.assertIn("NOT better", sparse_vs_dense.verdict(-0.01, 0.02))
    self.assertIn("spread unknown", sparse_vs_dense.verdict(0.1, None))

  def test_windows_of_a_run_without_operative_config_are_empty(self):
    with tempfile.TemporaryDirectory() as d:  # no operative_config.gin: the coefficients unknown
      self.assertIsNone(sparse_vs_dense.aux_loss_coefs(d))
      self.assertEqual(sparse_vs_dense.cross_entropy_windows(d, 20, windows=2), [None, None])
      with open(os.path.join(d, "operative_config.gin"), "w") as f:
        f.write("balance_loss_coef = 0.02\nrouter_z_loss_coef = 0.001\n"
                "encoder/SparseFFN.balance_loss_coef = %balance_loss_coef\n")
      self.assertEqual(sparse_vs_dense.aux_loss_coefs(d), (0.02, 0.001))

  def test_window_rows_average_seeds_and_show_dense_minus_sparse(self):
    config = common.Config(steps=20)
    windows = sparse_vs_dense.WINDOWS
    sparse = [[5.0] * windows, [4.0] * (windows - 1) + [None]]  # seed 1 lacks the last window
    dense = [[4.75] * windows, [4.75] * windows]
    headers, rows = sparse_vs_dense.window_rows(config, {"sparse": sparse, "dense": dense})
    self.assertEqual(headers[:3], ["steps", "1-2", "3-4"])
    self.assertEqual(headers[-1], "19-20")
    self.assertEqual(rows[0][1], "4.5000")  # (5 + 4) / 2
    self.assertEqual(rows[0][-1], "5.0000")  # seed 0 alone
    self.assertEqual(rows[1][1], "4.7500")
    self.assertEqual(rows[2][1], "+0.2500")  # 4.75 - 4.5: the sparse model ahead
    self.assertEqual(rows[2][-1], "-0.2500")


class EntropyTablesArithmeticTest(absltest.TestCase):
  """Tables 13 and 14 from hand-made traced layers (tracing.analyse's keys)."""

  @staticmethod
  def _layer(stack, sentinel_entropy, entropy, specialized=(), shares=None, rates=None):
    n = len(routing_stats.TOKEN_CLASSES)
    return {"stack": stack, "uniform_entropy": float(np.log(4)), "num_experts": 4,
            "router_entropy": entropy, "sentinel_router_entropy": sentinel_entropy,
            "num_sentinels": 3,
            "specialized": [dict(zip(("expert", "class", "share", "base_rate"), s))
                            for s in specialized],
            "class_shares": shares or [[1.0 / n] * n] * 4, "base_rates": rates or [1.0 / n] * n}

  def test_sentinel_and_all_token_columns_per_stack(self):
    seeds = [[self._layer("encoder", 0.5, 1.0), self._layer("decoder", None, 1.2)],
             [self._layer("encoder", 0.7, 1.1), self._layer("decoder", 0.9, 1.3)]]
    first = entropy.rows(seeds)[0]
    # Encoder sentinels: 0.5 and 0.7 -> 0.60 +- 0.14 (sample std sqrt(0.02)); all tokens 1.05.
    self.assertEqual(first[:3], [1, "0.60 +- 0.14", "1.05 +- 0.07"])
    # A seed with no decoder sentinel leaves that seed out: one value, no spread.
    self.assertEqual(first[3], 0.9)
    self.assertEqual(first[7], f"{0.6 / np.log(4):.2f} / 0.63")

  def test_specialisation_names_strongest_expert_and_counts_seeds(self):
    seed0 = [self._layer("encoder", 0.5, 1.0, specialized=[(2, "number", 0.4, 0.1),
                                                           (3, "number", 0.6, 0.1)]),
             self._layer("decoder", 0.5, 1.0, specialized=[(1, "verb", 0.9, 0.1)])]
    seed1 = [self._layer("encoder", 0.5, 1.0), self._layer("decoder", 0.5, 1.0)]
    found, encoder_layers = entropy.specialisation_rows([seed0, seed1])
    self.assertEqual(encoder_layers, 1)
    rows = {r[0]: r[1:] for r in found}
    self.assertEqual(rows["number"], ["1/2 seeds; expert 3: 60% vs 10%", "1"])
    self.assertEqual(rows["verb"], ["-", "1"])  # a decoder specialist is not Table 13's
    self.assertEqual(rows["sentinel"], ["-", "1, 4, 6"])

  def test_enrichment_grid(self):
    n = len(routing_stats.TOKEN_CLASSES)
    rates = [0.0] + [1.0 / (n - 1)] * (n - 1)  # no sentinel was traced
    shares = [[0.0] * n for _ in range(4)]
    shares[1][1] = 3.0 / (n - 1)  # expert 1: 3x the punctuation base rate
    grid = entropy.enrichment_grid([self._layer("encoder", None, 1.0, shares=shares, rates=rates)])
    self.assertTrue(np.isnan(grid[0][0]))  # no sentinel traced: a blank cell
    self.assertAlmostEqual(grid[1][0], 3.0)


class ResumedRunTest(absltest.TestCase):
  """One seed trained twice side by side, to step 4 and to step 2, ends bit-identical at step 2;
  the second, resumed from its checkpoint to step 4, trains on the batches the first did.

  The model is sparse with second_threshold_train = 1.0: at the default 0.2 an untrained 4-expert
  router's second gate (~0.25) is always kept, at 1.0 every second choice is a random draw. All
  measured here with 2 + 2 layers, 4 sequences of 32 + 8 tokens, learning rate 0.01 (2026-12-05):
  * Same seed, same run: the step-2 checkpoints agree in all 125 variables (weights and Adafactor
    slots). With upstream's seeding of mtf random ops (st_moe.determinism.seeded_random_ops=False)
    the draws differ in each process: the losses already differ at step 1 (7.75984 vs 7.75991)
    and 113 of the 125 variables differ at step 2. (With reference variables,
    ST_MOE_REF_VARIABLES=1, mesh_tensorflow's unordered update ops race the backward pass; on an
    AVX-512 machine that made two such runs differ, on this 2-core AVX2 machine it did not show.)
  * Resuming: without utils.run.skip_seen_data (jobs.train binds it) the resumed process reads
    the seeded data order from its first batch again: its step 3 sees step 1's batch. The resumed
    run's losses at steps 3 and 4 were then 7.5751 and 7.5262 against the uninterrupted run's
    7.7201 and 7.7965 (0.15 and 0.27 apart); with it, 7.71980 and 7.79632 (2.8e-4 and 2.2e-4
    apart). Not bit-identical: t5's checkpoints store the weights in bfloat16
    (utils.get_variable_dtype's master_dtype) and the uninterrupted run goes on from its float32
    copies, so the resumed run starts from weights rounded to bfloat16. The tolerance, 5e-3, is
    18x the difference with it and 1/29 of the one without.
  """

  def test_same_seed_same_run_and_resumed_run_reads_on_where_it_stopped(self):
    import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
    out = tempfile.mkdtemp(prefix="resumed_run_test_")
    self.addCleanup(shutil.rmtree, out, ignore_errors=True)
    settings = dict(SMALL, checkpoint_every=2,
                    gin_params=(CALM, "st_moe.SparseFFN.second_threshold_train = 1.0",
                                *entry_point.TWO_LAYERS))
    straight = common.Config(out=os.path.join(out, "straight"), **dict(settings, steps=4))
    stopped = common.Config(out=os.path.join(out, "resumed"), **dict(settings, steps=2))
    resumed = common.Config(out=stopped.out, **dict(settings, steps=4))
    variant = stability.VARIANTS["baseline"][1]

    def make(config):
      return common.make_run(config, "run", "stability", 0, variant)

    runs = [make(straight), make(stopped)]
    jobs.run_all(list(zip(runs, (straight, stopped))),
                 lambda item, show: common.train(item[0], item[1], show), jobs=2,
                 show=lambda line: None, tag=lambda item: item[1].out)
    # Same seed, same run: every variable of the two step-2 checkpoints, bit for bit.
    readers = [tf.train.load_checkpoint(os.path.join(run.model_dir, "model.ckpt-2"))
               for run in runs]
    names = sorted(readers[0].get_variable_to_shape_map())
    self.assertEqual(names, sorted(readers[1].get_variable_to_shape_map()))
    self.assertTrue(any(n.endswith("_slot_v") for n in names), names)
    self.assertTrue(any("/sparse_ffn/" in n for n in names), names)
    for name in names:
      np.testing.assert_array_equal(readers[0].get_tensor(name), readers[1].get_tensor(name),
                                    err_msg=name)
    lines = []
    common.train(make(resumed), resumed, lines.append)
    self.assertTrue(any("training steps 3..4 (resuming from its checkpoint)" in l for l in lines),
                    lines)
    (steps, straight_losses), (resumed_steps, resumed_losses) = (
        runner.steps_and_losses(run.model_dir) for run in runs)
    self.assertEqual(steps, [1, 2, 3, 4])
    self.assertEqual(resumed_steps, [1, 2, 3, 4])
    self.assertEqual(straight_losses[:2], resumed_losses[:2])  # one process each: identical
    np.testing.assert_allclose(resumed_losses[2:], straight_losses[2:], rtol=0, atol=5e-3)


class SeedingAndNormTest(absltest.TestCase):

  def test_same_seed_same_data_order(self):
    import gin  # pylint: disable=g-import-not-at-top
    import st_moe  # pylint: disable=g-import-not-at-top,unused-import
    import st_moe.tasks  # pylint: disable=g-import-not-at-top,unused-import
    from st_moe.experiments import seeding  # pylint: disable=g-import-not-at-top
    import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
    from t5.models import mesh_transformer  # pylint: disable=g-import-not-at-top,unused-import
    gin.clear_config()
    gin.bind_parameter("mesh_train_dataset_fn.mixture_or_task_name", common.DEFAULT_TASK)
    gin.bind_parameter("mesh_train_dataset_fn.use_cached", False)
    def first_targets(seed):
      with tf.Graph().as_default() as graph:
        ds = seeding.seeded_train_dataset_fn({"inputs": 32, "targets": 8}, None, "train",
                                             seed=seed)
        self.assertEqual(graph.seed, seed)
        with tf.Session() as sess:
          it = tf.data.make_one_shot_iterator(ds).get_next()
          return np.concatenate([sess.run(it)["targets"] for _ in range(3)])
    try:
      a, b, c = first_targets(1), first_targets(1), first_targets(2)
    finally:
      gin.clear_config()
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))
    with self.assertRaisesRegex(ValueError, "seed=-1"):
      seeding.seeded_train_dataset_fn({"inputs": 32, "targets": 8}, seed=-1)

  def test_rms_norm_without_scale_matches_numpy(self):
    import mesh_tensorflow as mtf  # pylint: disable=g-import-not-at-top
    import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
    from st_moe import norms  # pylint: disable=g-import-not-at-top
    x_np = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
    with tf.Graph().as_default():
      graph = mtf.Graph()
      mesh = mtf.Mesh(graph, "m")
      dims = [mtf.Dimension("b", 2), mtf.Dimension("l", 3), mtf.Dimension("d_model", 8)]
      x = mtf.import_tf_tensor(mesh, tf.constant(x_np), mtf.Shape(dims))
      context = type("C", (), {})()
      context.model = type("M", (), {"model_dim": dims[-1]})()
      y = norms.sublayer_rms_norm_no_scale(x, None, context, epsilon=1e-6)
      impl = mtf.placement_mesh_impl.PlacementMeshImpl(mtf.Shape([]), [], [""])
      lowering = mtf.Lowering(graph, {mesh: impl})
      with tf.Session() as sess:
        got = sess.run(lowering.export_to_tf_tensor(y))
    want = x_np / np.sqrt(np.mean(x_np ** 2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
