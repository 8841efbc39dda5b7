"""The divergence rule on synthetic loss curves: a NaN, a spike that stays, a spike that recovers."""
import math

from absl.testing import absltest
import numpy as np

from st_moe.experiments import divergence


def healthy(n=50):
  return list(4.0 * np.exp(-np.arange(n) / 20.0) + 1.5)


class DivergenceTest(absltest.TestCase):

  def test_healthy_curve_does_not_diverge(self):
    noisy = np.array(healthy()) + 0.05 * np.sin(np.arange(50))
    self.assertIsNone(divergence.find_divergence(list(noisy)))

  def test_nan_diverges_at_its_step(self):
    curve = healthy(20) + [math.nan] + healthy(5)
    found = divergence.find_divergence(curve, steps=[10 * i for i in range(len(curve))])
    self.assertEqual(found.step, 200)
    self.assertIn("nan", found.reason)

  def test_inf_diverges_even_during_warmup(self):
    self.assertEqual(divergence.find_divergence([5.0, math.inf, 4.0]).step, 1)

  def test_spike_that_stays_diverges_after_patience(self):
    curve = healthy(30)  # minimum ~2.4
    curve += [9.0, 9.5, 10.0, 10.0]
    found = divergence.find_divergence(curve, patience=3)
    self.assertEqual(found.step, 32)  # third consecutive observation above the threshold
    self.assertIn("running minimum", found.reason)

  def test_spike_that_recovers_is_not_a_divergence(self):
    curve = healthy(30) + [9.0, 9.0] + healthy(30)[-5:]
    self.assertIsNone(divergence.find_divergence(curve, patience=3))

  def test_small_rise_below_threshold_is_not_a_divergence(self):
    # running min ~2.42; threshold = min + max(1.0, 0.5*2.42) = ~3.63
    curve = healthy(30) + list(3.5 + 0.01 * np.cos(np.arange(10)))
    self.assertIsNone(divergence.find_divergence(curve))

  def test_monitor_keeps_reporting_once_diverged(self):
    monitor = divergence.DivergenceMonitor()
    first = monitor.update(0, math.nan)
    self.assertIs(monitor.update(1, 1.0), first)

  def test_bad_settings_are_named(self):
    with self.assertRaisesRegex(ValueError, "patience=0"):
      divergence.DivergenceMonitor(patience=0)
    with self.assertRaisesRegex(ValueError, r"collapse_dropped=1.5: must be a fraction in \[0, 1\)"):
      divergence.DivergenceMonitor(collapse_dropped=1.5)
    with self.assertRaisesRegex(ValueError, "frozen_patience=True: must be an integer >= 1"):
      divergence.DivergenceMonitor(frozen_patience=True)


class SmoothingTest(absltest.TestCase):
  """Rule (b) on the mean of the last `smoothing` losses: fine-tuning's noisy per-step losses."""

  def noisy_finetuning_curve(self):
    # A healthy fine-tuning run on 8 short sequences a step: the loss falls from 7.8 to about 3.5
    # with per-step noise of +-1 nat (the measured update-moe runs of finetune_params: 4.55 at
    # one step, then 6.62, 5.82 and 7.38 while the trend still fell).
    rng = np.random.default_rng(0)
    trend = 3.5 + 4.3 * np.exp(-np.arange(300) / 120.0)
    return list(trend + rng.standard_normal(300))

  def test_one_step_rule_stops_a_healthy_noisy_run_and_the_smoothed_rule_does_not(self):
    curve = self.noisy_finetuning_curve()
    self.assertIsNotNone(divergence.find_divergence(curve))  # the false alarm the option fixes
    self.assertIsNone(divergence.find_divergence(curve, smoothing=32))

  def test_a_rise_that_stays_is_caught_at_the_hand_computed_step(self):
    # 100 steps at 2.0, then 8.0 for good. Window of 32: after j + 1 losses of 8.0 the mean is
    # 2 + 6 (j + 1) / 32, above the threshold 2 + max(1.0, 0.5 x 2) = 3.0 from j = 5 on; the
    # third such observation is j = 7, step 107.
    curve = [2.0 + 1e-3 * (i % 2) for i in range(100)] + [8.0 + 1e-3 * (i % 2) for i in range(50)]
    found = divergence.find_divergence(curve, smoothing=32)
    self.assertEqual((found.kind, found.step), ("diverged", 107))
    self.assertIn("mean loss of the last 32 steps", found.reason)
    self.assertEqual(divergence.find_divergence(curve).step, 102)  # unsmoothed: j = 2

  def test_a_nan_still_stops_at_once(self):
    curve = self.noisy_finetuning_curve()[:10] + [math.nan]
    self.assertEqual(divergence.find_divergence(curve, smoothing=32).step, 10)

  def test_bad_smoothing_is_named(self):
    with self.assertRaisesRegex(ValueError, "smoothing=0: must be an integer >= 1"):
      divergence.DivergenceMonitor(smoothing=0)


def balanced(n, dropped=0.04, share=0.3, experts=4, seed=0):
  """Router metrics of a healthy run: a few percent dropped, first choices near 1 / E."""
  rng = np.random.default_rng(seed)
  return [{"max_dropped": dropped + 0.02 * rng.random(), "num_experts": experts,
           "max_expert_share": share + 0.05 * rng.random(), "consecutive_skipped": 0.0}
          for _ in range(n)]


class FrozenAndCollapseTest(absltest.TestCase):

  def test_healthy_noisy_run_with_router_metrics_passes(self):
    rng = np.random.default_rng(1)
    curve = list(4.0 * np.exp(-np.arange(200) / 50.0) + 1.5 + 0.03 * rng.standard_normal(200))
    self.assertIsNone(divergence.find_divergence(curve, metrics=balanced(200)))

  def test_exactly_constant_loss_is_frozen_after_patience(self):
    # The learning-rate-1000 run: the loss moved for two steps, then stayed at 7.0142.
    curve = [10.4, 84.0, 7.0142] + [7.0142] * 20
    found = divergence.find_divergence(curve, steps=list(range(1, 24)), warmup=50,
                                       frozen_patience=5)
    self.assertEqual(found.kind, "frozen")
    self.assertEqual(found.step, 8)  # steps 4..8: five unchanged observations after step 3
    self.assertIn("has not moved", found.reason)

  def test_change_above_tolerance_is_not_frozen(self):
    # Changes of 1e-3 on a loss of ~5 (2e-4 relative, above frozen_rtol = 1e-5) never freeze.
    curve = [5.0 + 1e-3 * (i % 2) for i in range(40)]
    self.assertIsNone(divergence.find_divergence(curve))
    # Changes of 1e-6 (2e-7 relative) do.
    curve = [5.0 + 1e-6 * (i % 2) for i in range(40)]
    self.assertEqual(divergence.find_divergence(curve).kind, "frozen")

  def test_skipped_updates_freeze_the_run_even_when_the_loss_moves(self):
    curve = healthy(30)
    rows = balanced(30)
    for i, row in enumerate(rows[10:]):
      row["consecutive_skipped"] = float(i + 1)  # every update from step 10 skipped
    found = divergence.find_divergence(curve, metrics=rows, frozen_patience=5)
    self.assertEqual((found.kind, found.step), ("frozen", 14))
    self.assertIn("5 consecutive updates skipped", found.reason)

  def test_dropped_tokens_above_threshold_for_patience_is_a_collapse(self):
    curve = healthy(40)
    rows = balanced(40)
    for row in rows[20:]:
      row["max_dropped"] = 0.67
    found = divergence.find_divergence(curve, metrics=rows, collapse_patience=10)
    self.assertEqual((found.kind, found.step), ("collapsed", 29))
    self.assertIn("67% of the tokens", found.reason)

  def test_a_passing_imbalance_is_not_a_collapse(self):
    curve = healthy(40)
    rows = balanced(40)
    for row in rows[20:29]:  # 9 steps, one short of the patience
      row["max_dropped"], row["max_expert_share"] = 0.8, 0.99
    self.assertIsNone(divergence.find_divergence(curve, metrics=rows, collapse_patience=10))

  def test_an_untrained_top1_router_is_not_a_collapse(self):
    # The largest fraction of a sparse layer's tokens dropped at steps 1-40 of top-1 at capacity
    # factor 1.0, --scale=small, seed 0 (2026-12-04; no expert over 3.7% of all the tokens); the
    # run trained on, 12% dropped at step 150. A patience of 10 stopped it at step 11.
    dropped = [0.48, 0.55, 0.67, 0.59, 0.74, 0.82, 0.76, 0.76, 0.73, 0.74, 0.54, 0.65, 0.58,
               0.65, 0.70, 0.57, 0.51, 0.44, 0.45, 0.46, 0.55, 0.51, 0.41, 0.43, 0.37, 0.55,
               0.40, 0.55, 0.48, 0.42, 0.40, 0.47, 0.46, 0.39, 0.47, 0.35, 0.43, 0.53, 0.60,
               0.45]
    curve = healthy(len(dropped))
    rows = [{"max_dropped": d, "max_expert_share": 0.035, "num_experts": 32} for d in dropped]
    self.assertIsNone(divergence.find_divergence(curve, metrics=rows))
    found = divergence.find_divergence(curve, metrics=rows, collapse_patience=10)
    self.assertEqual((found.kind, found.step), ("collapsed", 10))  # step 11 counted from 1

  def test_dropped_beyond_the_capacity_floor_is_what_counts(self):
    # Top-1 at capacity factor 0.5 drops half the tokens however balanced: 55% dropped is a tenth
    # of what its capacity could take, not a collapse; 80% of those is one.
    curve = healthy(120)
    rows = balanced(120)
    for row in rows:
      row["max_dropped"], row["max_excess_dropped"] = 0.55, 0.1
    self.assertIsNone(divergence.find_divergence(curve, metrics=rows))
    for row in rows[20:]:
      row["max_dropped"], row["max_excess_dropped"] = 0.9, 0.8
    found = divergence.find_divergence(curve, metrics=rows)
    self.assertEqual((found.kind, found.step), ("collapsed", 69))  # 50 steps from step 20
    self.assertIn("80% of the tokens of a sparse layer that its capacity could take were dropped",
                  found.reason)

  def test_one_expert_taking_nearly_all_tokens_is_a_collapse(self):
    curve = healthy(40)
    rows = balanced(40)
    for row in rows[5:]:
      row["max_expert_share"] = 1.0
    found = divergence.find_divergence(curve, metrics=rows, collapse_patience=10)
    self.assertEqual((found.kind, found.step), ("collapsed", 14))
    self.assertIn("one expert took 100% of the tokens", found.reason)
    # A layer of one expert always gives it every token: not a collapse.
    for row in rows:
      row["num_experts"] = 1
    self.assertIsNone(divergence.find_divergence(curve, metrics=rows))


if __name__ == "__main__":
  absltest.main()
