"""st_moe.experiments.events on event files written by TensorFlow's own writers.

Expected values are the numbers written (by tf's FileWriter / TF2 writer) and hand computations of
the per-step summaries.
"""
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
import tensorflow as tf

from st_moe.experiments import events


def write_events(log_dir, rows, name=None):
  """Writes [(step, tag, value, as_tensor)] with a TF1 FileWriter into log_dir; returns the path.

  `name` names the file (e.g. an older attempt's timestamp)."""
  with tempfile.TemporaryDirectory() as scratch, tf.Graph().as_default():
    writer = tf.compat.v1.summary.FileWriter(scratch)
    for step, tag, v, as_tensor in rows:
      value = tf.compat.v1.Summary.Value(tag=tag)
      if as_tensor:  # TF2 summaries (st_moe.summaries, mtf's host call) store a scalar tensor
        value.tensor.CopyFrom(tf.make_tensor_proto(np.float32(v)))
      else:  # TF1 summaries (the Estimator's loss) store simple_value
        value.simple_value = v
      writer.add_summary(tf.compat.v1.Summary(value=[value]), global_step=step)
    writer.close()
    (written,) = os.listdir(scratch)
    path = os.path.join(log_dir, name or written)
    shutil.move(os.path.join(scratch, written), path)
  return path


class EventReaderTest(absltest.TestCase):

  def test_reads_both_kinds_and_only_what_is_new(self):
    with tempfile.TemporaryDirectory() as d:
      write_events(d, [(1, "loss", 3.0, False), (2, "loss", 2.5, True)],
                   name="events.out.tfevents.100.host")
      reader = events.EventReader(d)
      self.assertEqual(reader.poll(), 2)
      self.assertEqual(reader.curve("loss"), ([1, 2], [3.0, 2.5]))
      self.assertEqual(reader.poll(), 0)  # nothing new
      write_events(d, [(3, "loss", 2.0, True)], name="events.out.tfevents.200.host")
      self.assertEqual(reader.poll(), 1)
      self.assertEqual(reader.curve("loss"), ([1, 2, 3], [3.0, 2.5, 2.0]))

  def test_a_record_still_being_written_waits_for_the_next_poll(self):
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as d:
      path = write_events(src, [(1, "loss", 3.0, False), (2, "loss", 2.5, False)])
      with open(path, "rb") as f:
        data = f.read()
      target = os.path.join(d, "events.out.tfevents.100.host")
      with open(target, "wb") as f:
        f.write(data[:-7])  # the last record cut short
      reader = events.EventReader(d)
      reader.poll()
      self.assertEqual(reader.curve("loss"), ([1], [3.0]))
      with open(target, "ab") as f:
        f.write(data[-7:])
      self.assertEqual(reader.poll(), 1)
      self.assertEqual(reader.curve("loss"), ([1, 2], [3.0, 2.5]))

  def test_later_attempt_wins_and_since_keeps_one_attempt(self):
    with tempfile.TemporaryDirectory() as d:
      # First attempt: steps 1..3 (killed after its checkpoint at 2); the second redoes step 3.
      write_events(d, [(1, "loss", 5.0, True), (2, "loss", 4.0, True), (3, "loss", 3.9, True)],
                   name="events.out.tfevents.1000.host")
      write_events(d, [(3, "loss", 3.5, True), (4, "loss", 3.0, True)],
                   name="events.out.tfevents.2000.host")
      reader = events.EventReader(d)
      reader.poll()
      self.assertEqual(reader.curve("loss"), ([1, 2, 3, 4], [5.0, 4.0, 3.5, 3.0]))
      second = events.EventReader(d, since=1500)
      second.poll()
      self.assertEqual(second.curve("loss"), ([3, 4], [3.5, 3.0]))
      steps, values = events.read_scalars(d, tags={"loss"})["loss"]
      np.testing.assert_array_equal(steps, [1, 2, 3, 4])
      np.testing.assert_allclose(values, [5.0, 4.0, 3.5, 3.0])

  def test_missing_directory_reads_nothing(self):
    reader = events.EventReader("/nonexistent/st_moe_events")
    self.assertEqual(reader.poll(), 0)
    self.assertEqual(reader.curve("loss"), ([], []))


class StepMetricsTest(absltest.TestCase):

  def test_router_by_step_summarises_layers_by_hand(self):
    enc, dec = "encoder/block_001/sparse_ffn/SparseFFN", "decoder/block_001/sparse_ffn/SparseFFN"
    scalars = {
        "loss": {1: 4.0},
        f"{enc}/router/z_loss": {1: 2.0}, f"{dec}/router/z_loss": {1: 4.0},
        f"{enc}/router/fraction_dropped": {1: 0.1}, f"{dec}/router/fraction_dropped": {1: 0.3},
        f"{enc}/router/expert_fraction/00": {1: 0.7}, f"{enc}/router/expert_fraction/01": {1: 0.3},
        f"{dec}/router/expert_fraction/00": {1: 0.5}, f"{dec}/router/expert_fraction/01": {1: 0.2},
        f"{dec}/router/expert_fraction/02": {1: 0.3},
        f"{enc}/router/balance_loss": {1: 1.2}, f"{dec}/router/balance_loss": {1: 2.7},
        f"{enc}/router/max_logit": {1: 3.5}, f"{dec}/router/max_logit": {1: 7.25},
        "st_moe_guard/consecutive_skipped": {1: 0.0, 2: 1.0},
    }
    row = events.router_by_step(scalars)[1]
    self.assertAlmostEqual(row["z_loss"], 3.0)  # (2 + 4) / 2
    self.assertAlmostEqual(row["dropped"], 0.2)  # (0.1 + 0.3) / 2
    self.assertAlmostEqual(row["max_dropped"], 0.3)
    self.assertEqual(row["max_logit"], 7.25)  # the largest of any layer, not a mean
    self.assertAlmostEqual(row["max_expert_fraction"], 0.7)
    # Shares: encoder min(0.7, 1.2 / 2) = 0.6, decoder min(0.5, 2.7 / 3) = 0.5.
    self.assertAlmostEqual(row["max_expert_share"], 0.6)
    self.assertEqual(row["num_experts"], 2)  # the encoder layer's 2 < the decoder's 3
    self.assertEqual(set(events.router_layers(scalars)), {enc, dec})
    metrics = events.step_metrics(scalars)
    self.assertEqual(metrics[2], {"consecutive_skipped": 1.0})
    self.assertEqual(metrics[1]["consecutive_skipped"], 0.0)

  def test_excess_dropped_discounts_what_the_capacity_always_drops(self):
    top1, top2 = "encoder/block_001/sparse_ffn/SparseFFN", "decoder/block_001/sparse_ffn/SparseFFN"
    scalars = {
        # Top-1 at capacity factor 0.75: 0.75 slots per token, a quarter of the tokens always
        # dropped; 62.5% dropped is half of the other three quarters.
        f"{top1}/router/fraction_dropped": {1: 0.625, 2: 0.25},
        f"{top1}/router/slots_per_token": {1: 0.75, 2: 0.75},
        # Top-2 at 1.25: 1.25 slots per token (the capacity is not multiplied by k, as in MTF),
        # nothing dropped by design.
        f"{top2}/router/fraction_dropped": {1: 0.3, 2: 0.4},
        f"{top2}/router/slots_per_token": {1: 1.25, 2: 1.25},
    }
    layers = events.router_layers(scalars)
    self.assertAlmostEqual(events.excess_dropped(layers[top1], 1), 0.5)
    self.assertAlmostEqual(events.excess_dropped(layers[top1], 2), 0.0)
    self.assertAlmostEqual(events.excess_dropped(layers[top2], 1), 0.3)
    rows = events.router_by_step(scalars)
    self.assertAlmostEqual(rows[1]["max_excess_dropped"], 0.5)  # top-1's, above top-2's 0.3
    self.assertAlmostEqual(rows[1]["max_dropped"], 0.625)
    self.assertAlmostEqual(rows[2]["max_excess_dropped"], 0.4)
    # Event files written before the layer reported its slots: the fraction dropped itself.
    del scalars[f"{top1}/router/slots_per_token"]
    self.assertAlmostEqual(events.router_by_step(scalars)[1]["max_excess_dropped"], 0.625)

  def test_cross_entropy_is_the_loss_less_weighted_aux_losses_by_hand(self):
    enc, dec = "encoder/block_001/sparse_ffn/SparseFFN", "decoder/block_001/sparse_ffn/SparseFFN"
    scalars = {
        "loss": {1: 5.0, 2: 4.0, 3: 3.0},
        f"{enc}/router/balance_loss": {1: 1.0, 2: 1.5, 3: 1.0},
        f"{dec}/router/balance_loss": {1: 2.0, 2: 2.5},  # step 3: missing in one layer
        f"{enc}/router/z_loss": {1: 10.0, 2: 20.0, 3: 1.0},
        f"{dec}/router/z_loss": {1: 30.0, 2: 40.0, 3: 1.0},
    }
    found = events.cross_entropy_by_step(scalars, 0.01, 0.001)
    # Step 1: 5 - (0.01 x (1 + 2) + 0.001 x (10 + 30)) = 5 - 0.07; step 2: 4 - (0.04 + 0.06).
    self.assertEqual(sorted(found), [1, 2])
    self.assertAlmostEqual(found[1], 4.93)
    self.assertAlmostEqual(found[2], 3.9)
    # A dense model: the loss itself.
    self.assertEqual(events.cross_entropy_by_step({"loss": {1: 5.0}}, 0.01, 0.001), {1: 5.0})

  def test_evaluations_by_folder_and_step(self):
    with tempfile.TemporaryDirectory() as d:
      ev = os.path.join(d, "eval_validation_8")
      os.makedirs(ev)
      write_events(ev, [(6, "neg_log_perplexity", -4.5, False),
                        (6, "enc/router/fraction_dropped", 0.25, False),
                        (6, "dec/router/fraction_dropped", 0.75, False)],
                   name="events.out.tfevents.100.host")
      os.makedirs(os.path.join(d, "logs"))
      found = events.evaluations(d)
      self.assertEqual(list(found), ["eval_validation_8"])
      metrics = found["eval_validation_8"][6]
      self.assertAlmostEqual(metrics["neg_log_perplexity"], -4.5)
      self.assertAlmostEqual(events.summarise_router_metrics(metrics)["fraction_dropped"], 0.5)
      self.assertEqual(events.evaluations(d, since=200), {})


if __name__ == "__main__":
  absltest.main()
