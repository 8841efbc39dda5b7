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
    curve = healthy(30) + [3.5] * 10
    self.assertIsNone(divergence.find_divergence(curve))

  def test_monitor_keeps_reporting_once_diverged(self):
    monitor = divergence.DivergenceMonitor()
    first = monitor.update(0, math.nan)
    self.assertIs(monitor.update(1, 1.0), first)

  def test_bad_settings_are_named(self):
    with self.assertRaisesRegex(ValueError, "patience=0"):
      divergence.DivergenceMonitor(patience=0)


if __name__ == "__main__":
  absltest.main()
