"""Tests of st_moe.analysis.reporting: tables, event-file reading, PNG output."""
import os
import tempfile

from absl.testing import absltest
import numpy as np
import tensorflow as tf

from st_moe.analysis import reporting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ReportingTest(absltest.TestCase):

  def test_markdown_table(self):
    text = reporting.markdown_table(["model", "loss"], [["a|b", 1.23456], ["c", None]])
    self.assertEqual(text, "| model | loss |\n|---|---|\n| a\\|b | 1.235 |\n| c |  |\n")
    with self.assertRaisesRegex(ValueError, "1 cells for 2 headers"):
      reporting.markdown_table(["a", "b"], [[1]])

  def test_read_scalars_reads_both_summary_kinds_last_value_wins(self):
    # Written as Event protos by a TF1 FileWriter, which needs a graph context (tests run eagerly).
    with tempfile.TemporaryDirectory() as d, tf.Graph().as_default():
      writer = tf.compat.v1.summary.FileWriter(d)
      for step, v, as_tensor in [(1, 3.0, False), (2, 2.5, True), (2, 2.0, False), (5, 1.0, True)]:
        value = tf.compat.v1.Summary.Value(tag="loss")
        if as_tensor:  # TF2 summaries (mtf's host call) store a scalar tensor
          value.tensor.CopyFrom(tf.make_tensor_proto(np.float32(v)))
        else:  # TF1 summaries (the Estimator's loss) store simple_value
          value.simple_value = v
        writer.add_summary(tf.compat.v1.Summary(value=[value]), global_step=step)
      writer.add_summary(tf.compat.v1.Summary(
          value=[tf.compat.v1.Summary.Value(tag="other", simple_value=7.0)]), global_step=1)
      writer.close()
      got = reporting.read_scalars(d, tags={"loss"})
      everything = reporting.read_scalars(d)
    self.assertEqual(set(got), {"loss"})
    self.assertEqual(set(everything), {"loss", "other"})
    steps, values = got["loss"]
    np.testing.assert_array_equal(steps, [1, 2, 5])
    np.testing.assert_allclose(values, [3.0, 2.0, 1.0])

  def test_pngs_are_written(self):
    with tempfile.TemporaryDirectory() as d:
      curve = reporting.plot_loss_curves({"a": ([0, 1, 2], [3.0, 2.0, float("nan")])},
                                         os.path.join(d, "sub", "c.png"), "t")
      heat = reporting.plot_heatmap(np.eye(3), ["e0", "e1", "e2"], ["x", "y", "z"],
                                    os.path.join(d, "h.png"), "t")
      panels = reporting.plot_panels(
          {"v1": {"s0": ([1, 2, 3], [5.0, 4.0, 3.0]), "s1": ([1, 2], [5.0, 90.0])},
           "v2": {"s0": ([1, 2, 3], [5.0, 4.5, 4.0])}}, os.path.join(d, "p.png"), "t",
          ylim=(2.0, 10.0), columns=4, stopped=[("v1", "s1")])
      for path in (curve, heat, panels):
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), PNG_MAGIC)
        self.assertGreater(os.path.getsize(path), 1000)
      with self.assertRaisesRegex(ValueError, "does not match"):
        reporting.plot_heatmap(np.eye(3), ["a"], ["x"], os.path.join(d, "bad.png"), "t")


  def test_format_mean_std_prints_no_spread_for_one_seed(self):
    self.assertEqual(reporting.format_mean_std([-1.25]), "-1.250")
    # mean 2.0, sample std sqrt(((1-2)^2 + (3-2)^2) / 1) = 1.414
    self.assertEqual(reporting.format_mean_std([1.0, 3.0, None]), "2.000 +- 1.414")
    self.assertEqual(reporting.format_mean_std([None, float("nan")]), "")
    self.assertEqual(reporting.format_mean_std([0.5, 0.5], "{:.1f}"), "0.5 +- 0.0")

  def test_smooth_is_a_trailing_mean_that_skips_nan(self):
    got = reporting.smooth([1.0, 3.0, float("nan"), 5.0, 7.0], window=2)
    np.testing.assert_allclose(got, [1.0, 2.0, 3.0, 5.0, 6.0])
    with self.assertRaisesRegex(ValueError, "window=0"):
      reporting.smooth([1.0], 0)

  def test_new_plots_are_written(self):
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as d:
      steps = np.arange(0, 200, 2)
      paths = [
          reporting.plot_loss_curves(
              {"st_moe_tiny": (steps, 6 * np.exp(-steps / 80) + 2 + 0.3 * rng.randn(100)),
               "dense_tiny": (steps, 6 * np.exp(-steps / 90) + 2.2 + 0.3 * rng.randn(100))},
              os.path.join(d, "loss.png"), "Training loss",
              validation={"st_moe_tiny": ([100, 198], [2.9, 2.4]),
                          "dense_tiny": ([100, 198], [3.1, 2.6])}),
          reporting.plot_entropy_bars(
              {"ours": {"encoder": [0.9, 0.8], "decoder": [0.95, 0.7]},
               "paper": {"encoder": [0.6, 0.5, 0.4, 0.6, 0.7, 0.8],
                         "decoder": [0.9, 0.9, 0.9, 0.9, 0.9, 0.9]}},
              os.path.join(d, "entropy.png"), "Router entropy",
              errors={"ours": {"encoder": [0.02, 0.03], "decoder": [0.01, 0.02]}}),
          reporting.plot_routing_heatmap(np.array([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0.2, 0.8]]),
                                         [0.25, 0.25, 0, 0, 0.1, 0.4], list("abcdef"),
                                         os.path.join(d, "heat.png"), "Classes"),
          reporting.plot_capacity_grid(
              [[[-2.10, -2.12], [-2.05, -2.06]], [[-2.08, -2.09], [-2.04, -2.03]]],
              [1.0, 1.25], [1.0, 2.0], os.path.join(d, "capacity.png"), "Capacity"),
          reporting.plot_capacity_grid([[[-2.1], [-2.0]]], [1.25], [1.0, 2.0],
                                       os.path.join(d, "capacity_one_seed.png"), "One seed"),
          reporting.plot_gap([(1, 100), (101, 200), (201, 300)], [0.02, None, -0.03],
                             os.path.join(d, "gap.png"), "Sparse ahead by",
                             point=(300, -0.027, 0.017, "validation")),
          reporting.plot_bar_panels(
              {"ours": ("accuracy", {"sparse": {"LR 1e-4": 0.0, "LR 1e-3": 82.5},
                                     "dense": {"LR 1e-4": None, "LR 1e-3": 85.5}}),
               "paper": ("SuperGLUE", {"sparse": {"LR 1e-4": 84.9, "LR 1e-3": 85.9},
                                       "dense": {"LR 1e-4": 84.7, "LR 1e-3": 84.0}})},
              os.path.join(d, "bars.png"), "Figure 6"),
      ]
      for path in paths:
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), PNG_MAGIC, path)
      with self.assertRaisesRegex(ValueError, "no encoder or decoder values"):
        reporting.plot_entropy_bars({"ours": {}}, os.path.join(d, "e.png"), "t")
      with self.assertRaisesRegex(ValueError, r"plot_bar_panels: no values in the panels \['ours'\]"):
        reporting.plot_bar_panels({"ours": ("accuracy", {"sparse": {"LR 1e-3": None}})},
                                  os.path.join(d, "b.png"), "t")
      if os.environ.get("ST_MOE_KEEP_PNG"):
        import shutil  # pylint: disable=g-import-not-at-top
        shutil.copytree(d, os.environ["ST_MOE_KEEP_PNG"], dirs_exist_ok=True)


if __name__ == "__main__":
  absltest.main()
