"""tools/reproduce.py: each table at a very small setting, the divergence rule, seeds and variants.

The tables run for real through t5_mesh_transformer (1 seed, 6 steps, tiny shapes); the entropy
table reuses the capacity table's run, as the tool does at full size.
"""
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time

from absl.testing import absltest
import numpy as np

from st_moe.experiments import divergence
from st_moe.experiments import reproduce
from st_moe.experiments import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = dict(seeds=1, steps=6, batch_size=4, inputs_length=32, targets_length=8, eval_steps=1,
             checkpoint_every=6, trace_tokens=64)


def _small_flags():
  return [f"--{k}={v}" for k, v in SMALL.items() if k != "trace_tokens"]


class TablesTest(absltest.TestCase):
  """One small run of every table; the outputs are checked for shape and content."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = tempfile.mkdtemp(prefix="reproduce_test_")
    cls.stability_proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "reproduce.py"), "stability",
         "--variants=remove_rmsnorm_scale", f"--out={cls.out}"] + _small_flags(),
        capture_output=True, text=True, timeout=900)
    config = reproduce.Config(out=cls.out, train_capacity_factors=(1.25,),
                              eval_capacity_factors=(2.0,), **SMALL)
    cls.lines = []
    cls.capacity_md = reproduce.run_table("capacity", config, show=cls.lines.append)
    cls.entropy_md = reproduce.run_table("entropy", config, show=cls.lines.append)

  def _csv(self, table):
    with open(os.path.join(self.out, table, f"{table}.csv")) as f:
      rows = list(csv.reader(f))
    self.assertGreater(len(rows), 1)
    self.assertTrue(all(len(r) == len(rows[0]) for r in rows), rows)
    return rows

  def _check_md_png(self, table, png):
    with open(os.path.join(self.out, table, f"{table}.md")) as f:
      md = f.read()
    lines = [l for l in md.splitlines() if l.startswith("|")]
    self.assertGreaterEqual(len(lines), 3)
    self.assertEqual(len({l.count("|") for l in lines}), 1, md)
    with open(os.path.join(self.out, table, png), "rb") as f:
      self.assertEqual(f.read(8), PNG_MAGIC)
    with open(os.path.join(self.out, table, f"{table}_commands.md")) as f:
      commands = f.read()
    self.assertIn("t5_mesh_transformer", commands)
    self.assertIn("--gin_file=st_moe_tiny.gin", commands)
    self.assertIn("--model_dir=$OUT/runs/", commands)  # portable: no path of this machine
    self.assertNotIn(self.out, commands)
    self.assertNotIn(REPO + os.sep, commands)
    return md

  def test_stability_table(self):
    self.assertEqual(self.stability_proc.returncode, 0, self.stability_proc.stderr[-3000:])
    rows = self._csv("stability")
    self.assertEqual(rows[0][:4], ["variant", "change", "stable runs", "quality (ours)"])
    self.assertEqual(len(rows), 2)
    row = dict(zip(rows[0], rows[1]))
    self.assertEqual(row["variant"], "remove_rmsnorm_scale")
    self.assertEqual(row["stable runs (paper)"], "3/3")
    self.assertEqual(row["quality (paper)"], "-2.020 +- 0.06")
    if row["stable runs"] == "1/1":  # quality is a negative log perplexity of a 6-step model
      quality = float(row["quality (ours)"].split("+-")[0])
      self.assertTrue(-12.0 < quality < 0.0, row)
    else:
      self.assertEqual(row["stable runs"], "0/1")
      self.assertIn("seed 0 at step", row["diverged runs"])
    self._check_md_png("stability", "stability_curves.png")
    with open(os.path.join(self.out, "stability", "stability_commands.md")) as f:
      self.assertIn("--gin_file=stability_tiny.gin", f.read())

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
    self.assertEqual(len(rows), 2)
    row = dict(zip(rows[0], rows[1]))
    self.assertEqual((row["train CF"], row["eval CF"]), ("1.25", "2.0"))
    self.assertTrue(-12.0 < float(row["quality"].split("+-")[0]) < 0.0, row)
    for key in ("dropped % (eval)", "dropped % (train)"):
      self.assertTrue(0.0 <= float(row[key]) <= 100.0, row)
    self.assertGreater(float(row["step time (s)"]), 0.0)
    self.assertEqual(row["step time ST-MoE-L (paper, s)"], "2.397")
    self._check_md_png("capacity", "capacity.png")

  def test_entropy_table_reuses_capacity_run_and_respects_bound(self):
    trained = [l for l in self.lines if "default_cf1.25_seed0] training" in l]
    self.assertLen(trained, 1, self.lines)  # trained by capacity, reused by entropy
    rows = self._csv("entropy")
    header, body = rows[0], rows[1:]
    self.assertEqual(header[:3], ["sparse layer", "encoder (ours)", "decoder (ours)"])
    bound = body[-1]
    self.assertEqual(bound[0], "uniform bound (ln E)")
    self.assertAlmostEqual(float(bound[1]), np.log(4), places=3)
    self.assertAlmostEqual(float(bound[3]), np.log(32), places=2)
    ours = [float(r[c]) for r in body[:-1] for c in (1, 2) if r[c]]
    self.assertLen(ours, 4)  # st_moe_tiny: 2 sparse layers per stack
    for value in ours:
      self.assertTrue(0.0 <= value <= np.log(4) + 1e-6, value)
    self.assertEqual([float(r[3]) for r in body[:6]], [2.2, 1.8, 1.6, 1.7, 1.7, 1.2])
    self._check_md_png("entropy", "entropy.png")

  def test_rerun_skips_finished_runs(self):
    lines = []
    config = reproduce.Config(out=self.out, train_capacity_factors=(1.25,),
                              eval_capacity_factors=(2.0,), **SMALL)
    reproduce.run_table("capacity", config, show=lines.append)
    self.assertTrue(any("already trained" in l for l in lines), lines)
    self.assertFalse(any("training steps" in l or "evaluating" in l for l in lines), lines)


class DivergenceInTheLoopTest(absltest.TestCase):
  """The rule as the training loop applies it: loss lines in, a stop (or not) out."""

  def _feed(self, losses):
    parser = runner.ProgressParser(1, monitor=divergence.DivergenceMonitor())
    for step, loss in enumerate(losses):
      parser.feed(f"I step, tf_loss[{loss}][{step}]")
      if parser.diverged:
        break
    return parser.diverged

  def test_nan_stops_the_run(self):
    found = self._feed([5.0, 4.8, 4.7, float("nan"), 4.5])
    self.assertEqual(found.step, 3)
    self.assertIn("nan", found.reason)

  def test_spike_that_stays_stops_the_run(self):
    # running min 4.0; threshold 4.0 + max(1, 2.0) = 6.0; three observations above it.
    found = self._feed([6.0, 5.0, 4.5, 4.2, 4.0, 4.1, 9.0, 9.5, 8.0, 4.0])
    self.assertEqual(found.step, 8)

  def test_healthy_curve_runs_to_the_end(self):
    self.assertIsNone(self._feed(list(np.linspace(7.0, 3.0, 50) + 0.1 * np.sin(np.arange(50)))))


class SettingsTest(absltest.TestCase):

  def test_bad_settings_are_named(self):
    for table, changes, needle in (
        ("table", {}, "TABLE='table'"),
        ("stability", {"seeds": 0}, "--seeds=0"),
        ("stability", {"variants": ("baseline", "typo")}, "--variants='typo'"),
        ("capacity", {"train_capacity_factors": (1.0, -2.0)}, "--train_capacity_factors"),
        ("stability", {"scale": "xl"}, "--scale='xl'"),
        ("stability", {"scale": "l"}, "--tpu"),
        ("capacity", {"jobs": 0}, "--jobs=0"),
    ):
      with self.assertRaisesRegex(ValueError, needle.replace("(", r"\(").replace("[", r"\[")):
        reproduce.validate(table, reproduce.Config(**changes))

  def test_every_paper_row_has_a_variant(self):
    self.assertLen(reproduce.STABILITY_VARIANTS, 7)
    for name, (_, bindings, _) in reproduce.STABILITY_VARIANTS.items():
      z = [b for b in bindings if b.startswith("router_z_loss_coef")]
      self.assertEqual(z, ["router_z_loss_coef = 0.001" if name == "router_z_loss"
                           else "router_z_loss_coef = 0.0"])


class EachRunTest(absltest.TestCase):
  """Runs side by side (--jobs): all started at once, results in the runs' order, lines tagged."""

  def _runs(self, n):
    return [reproduce.Run(f"r{i}", [], [], f"/nonexistent/r{i}") for i in range(n)]

  def test_two_jobs_overlap_and_keep_order(self):
    barrier = threading.Barrier(2, timeout=20)  # broken unless two runs are in flight together
    lines = []

    def prepare(run, show):
      barrier.wait()
      time.sleep(0.2 if run.run_id == "r0" else 0.0)  # r0 finishes last
      show("[train] step 1")
      show(f"[{run.run_id}] done")
      return run.run_id.upper()

    self.assertEqual(reproduce.each_run(self._runs(2), prepare, 2, lines.append), ["R0", "R1"])
    self.assertCountEqual(lines, ["[r0] [train] step 1", "[r1] [train] step 1", "[r0] done",
                                  "[r1] done"])

  def test_one_job_runs_one_at_a_time(self):
    active, peak = [0], [0]

    def prepare(run, show):
      del show
      active[0] += 1
      peak[0] = max(peak[0], active[0])
      time.sleep(0.05)
      active[0] -= 1
      return run.run_id

    self.assertEqual(reproduce.each_run(self._runs(3), prepare, 1, print), ["r0", "r1", "r2"])
    self.assertEqual(peak[0], 1)

  def test_a_failing_run_is_raised(self):
    def prepare(run, show):
      del show
      if run.run_id == "r1":
        raise RuntimeError("training failed for r1")
      return run.run_id

    with self.assertRaisesRegex(RuntimeError, "r1"):
      reproduce.each_run(self._runs(3), prepare, 2, print)


class SameSeedSameRunTest(absltest.TestCase):
  """Two trainings of one seed, side by side, end bit-identical (losses and every variable).

  This fails with reference variables (ST_MOE_REF_VARIABLES=1): mesh_tensorflow's unordered
  update ops then race the backward pass and the step-1 Adafactor statistics already differ.
  """

  def test_two_runs_of_one_seed_are_identical(self):
    import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
    out = tempfile.mkdtemp(prefix="same_seed_test_")
    config = reproduce.Config(out=out, **dict(SMALL, steps=3, checkpoint_every=3))
    params = (reproduce.common_params(config, 0)
              + reproduce.STABILITY_VARIANTS["baseline"][1])
    runs = [reproduce.Run(f"copy{i}", reproduce.model_gin_files(config, "stability"), params,
                          os.path.join(out, f"copy{i}")) for i in range(2)]
    reproduce.each_run(runs, lambda run, show: reproduce.train(run, config, show), jobs=2,
                       show=lambda line: None)
    curves = [runner.steps_and_losses(run.model_dir) for run in runs]
    self.assertEqual(curves[0][0], [1, 2, 3])
    self.assertEqual(curves[0], curves[1])
    readers = [tf.train.load_checkpoint(os.path.join(run.model_dir, "model.ckpt-3"))
               for run in runs]
    names = sorted(readers[0].get_variable_to_shape_map())
    self.assertEqual(names, sorted(readers[1].get_variable_to_shape_map()))
    self.assertTrue(any(n.endswith("_slot_v") for n in names), names)
    for name in names:
      np.testing.assert_array_equal(readers[0].get_tensor(name), readers[1].get_tensor(name),
                                    err_msg=name)


class SeedingAndNormTest(absltest.TestCase):

  def test_same_seed_same_data_order(self):
    import gin  # pylint: disable=g-import-not-at-top
    import st_moe  # pylint: disable=g-import-not-at-top,unused-import
    import st_moe.tasks  # pylint: disable=g-import-not-at-top,unused-import
    from st_moe.experiments import seeding  # pylint: disable=g-import-not-at-top
    import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
    from t5.models import mesh_transformer  # pylint: disable=g-import-not-at-top,unused-import
    gin.clear_config()
    gin.bind_parameter("mesh_train_dataset_fn.mixture_or_task_name", reproduce.DEFAULT_TASK)
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
