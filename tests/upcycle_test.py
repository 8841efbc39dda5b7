"""Sparse upcycling (tools/upcycle.py, st_moe/upcycling.py), end to end and on hand-made lists.

End to end: a tiny dense T5.1.1 (gin/models/t5_1_1_tiny.gin: t5's structure and checkpoint names)
trains 2 steps through t5_mesh_transformer on the byte task of tests/testing_tasks.py; the tool
upcycles it to st_moe_tiny.gin (same sizes; both with 2 + 2 layers, LAYERS); then
  * with identical experts, renormalised gates, the second expert always kept and a capacity of
    every token (nothing dropped), the upcycled model's logits equal the dense model's on the same
    batch (both computed in-process from the two checkpoints); with a capacity that drops tokens
    they do not (the comparison can fail);
  * the checkpoint holds what the tool promises, read back against the dense checkpoint;
  * a model of other sizes fails naming the variable and both shapes, and writes nothing;
  * fine-tuning the upcycled checkpoint (finetune.gin, utils.run.init_checkpoint) runs 2 steps
    through t5_mesh_transformer, starting from the upcycled values.
The name mapping and the slot tiling are also checked on hand-written variable lists whose
expected results are written out by hand (T5.1.1-Large sizes for the factored Adafactor slots).
Each t5_mesh_transformer process spends ~25 s starting.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

import entry_point
import mesh_tensorflow as mtf
from mesh_tensorflow import optimize
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import seqio
import tensorflow.compat.v1 as tf

from st_moe import upcycling
from st_moe.analysis import model_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TIMEOUT = 600
VOCAB_SIZE = seqio.ByteVocabulary(extra_ids=100).vocab_size  # the byte task's: 3 + 256 + 100
DENSE_STEPS = 2
FLOAT32 = ['utils.get_variable_dtype.activation_dtype = "float32"']
# Renormalised gates are st_moe_tiny's default; keep every second choice, and give each expert a
# buffer of every token of its group (C = S when capacity_factor = num_experts = 4).
NOTHING_DROPPED = ["st_moe.SparseFFN.renormalize_gates = True",
                   "st_moe.SparseFFN.second_policy_eval = 'all'", "capacity_factor_eval = 4.0"]
# The end-to-end models have 2 + 2 layers (tests/entry_point.py): block 1 of each stack is the
# sparse one, upcycled from the dense model's block 1.
LAYERS = list(entry_point.TWO_LAYERS)


_env = entry_point.env


def _t5_command(model_dir, model_gin, run_gin, *gin_params):
  return [os.path.join(BIN, "t5_mesh_transformer"), "--module_import=testing_tasks",
          f"--model_dir={model_dir}", f"--gin_file={model_gin}", "--gin_file=cpu.gin",
          f"--gin_file={run_gin}",
          "--gin_param=MIXTURE_NAME = 'st_moe_test_bytes_span_corruption'",
          "--gin_param=utils.run.sequence_length = {'inputs': 64, 'targets': 16}",
          "--gin_param=utils.run.batch_size = ('sequences_per_batch', 4)",
          "--gin_param=utils.run.iterations_per_loop = 2",
          *[f"--gin_param={p}" for p in (*LAYERS, *gin_params)]]


def _upcycle_command(dense, out, *gin_params):
  return [sys.executable, os.path.join(REPO, "tools", "upcycle.py"), f"--dense_checkpoint={dense}",
          "--gin_file=st_moe_tiny.gin", "--gin_file=cpu.gin", f"--out={out}",
          f"--vocab_size={VOCAB_SIZE}", *[f"--gin_param={p}" for p in (*LAYERS, *gin_params)]]


def _run(command, cwd):
  out = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=cwd,
                       timeout=TIMEOUT, check=False)
  return out.returncode, out.stdout + out.stderr


def logits(gin_files, gin_params, checkpoint, inputs, targets):
  """<float32>[B, Lt, V] teacher-forced logits of the model in `gin_files`, from a checkpoint.

  mesh_tensorflow's own model code (utils.build_model, Bitransformer.call_simple in eval mode) on
  one CPU device; nothing of st_moe.upcycling.
  """
  model_graph.parse_gin(gin_files, list(gin_params) + FLOAT32)
  batch, inputs_length = inputs.shape
  with tf.Graph().as_default():
    model = mtf_utils.build_model(
        model_type="bitransformer", input_vocab_size=VOCAB_SIZE, output_vocab_size=VOCAB_SIZE,
        layout_rules=mtf.convert_to_layout_rules(""), mesh_shape=mtf.convert_to_shape(""))
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "my_mesh")
    batch_dim = mtf.Dimension("batch", batch)
    x = mtf.import_fully_replicated(
        mesh, tf.constant(inputs), mtf.Shape([batch_dim, mtf.Dimension("length", inputs_length)]),
        name="inputs")
    y = mtf.import_fully_replicated(
        mesh, tf.constant(targets),
        mtf.Shape([batch_dim, mtf.Dimension("length", targets.shape[1])]), name="targets")
    out, _ = model.call_simple(inputs=x, targets=y, compute_loss=False, mode="eval",
                               variable_dtype=mtf_utils.get_variable_dtype())
    mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
    lowering = mtf.Lowering(graph, {mesh: mesh_impl})
    tf_out = lowering.export_to_tf_tensor(out)
    saver = tf.train.Saver(var_list=tf.global_variables())
    with tf.Session() as sess:
      saver.restore(sess, checkpoint)
      sess.run(lowering.copy_masters_to_slices())
      return sess.run(tf_out)


def _read(checkpoint, name):
  return np.asarray(tf.train.load_checkpoint(checkpoint).get_tensor(name)).astype(np.float32)


class UpcycleEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="st_moe_upcycle_")
    code, log = _run(_t5_command(os.path.join(cls.tmp, "dense"), "t5_1_1_tiny.gin",
                                 "pretrain_c4.gin", f"utils.run.train_steps = {DENSE_STEPS}",
                                 f"utils.run.save_checkpoints_steps = {DENSE_STEPS}"), cls.tmp)
    assert code == 0, log[-5000:]
    cls.dense = os.path.join(cls.tmp, "dense", f"model.ckpt-{DENSE_STEPS}")
    cls.up_dir = os.path.join(cls.tmp, "up")
    code, cls.upcycle_log = _run(_upcycle_command(os.path.join(cls.tmp, "dense"), cls.up_dir),
                                 cls.tmp)
    assert code == 0, cls.upcycle_log[-5000:]
    cls.up = os.path.join(cls.up_dir, f"model.ckpt-{DENSE_STEPS}")  # --step=keep
    # Started now, read in test_finetune_...: its start-up overlaps the in-process tests. Its
    # output goes to a file: a pipe nobody reads would fill and stall it.
    cls.finetune_dir = os.path.join(cls.tmp, "finetune")
    cls.finetune_log = open(  # pylint: disable=consider-using-with
        os.path.join(cls.tmp, "finetune.log"), "w")
    cls.finetune = subprocess.Popen(
        _t5_command(cls.finetune_dir, "st_moe_tiny.gin", "finetune.gin",
                    f"utils.run.init_checkpoint = '{cls.up}'",
                    f"utils.run.train_steps = {DENSE_STEPS + 2}",
                    f"utils.run.save_checkpoints_steps = {DENSE_STEPS + 2}"),
        stdout=cls.finetune_log, stderr=subprocess.STDOUT, env=_env(), cwd=cls.tmp)

  @classmethod
  def tearDownClass(cls):
    if cls.finetune.poll() is None:
      cls.finetune.kill()
      cls.finetune.wait()
    cls.finetune_log.close()
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_upcycled_logits_equal_the_dense_models_when_nothing_is_dropped(self):
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 259, (4, 16)).astype(np.int32)  # byte ids, no padding
    targets = rng.integers(3, 259, (4, 8)).astype(np.int32)
    dense = logits(["t5_1_1_tiny.gin", "cpu.gin"], LAYERS, self.dense, inputs, targets)
    sparse = logits(["st_moe_tiny.gin", "cpu.gin"], LAYERS + NOTHING_DROPPED, self.up, inputs,
                    targets)
    self.assertEqual(dense.shape, (4, 8, 384))
    self.assertGreater(np.abs(dense).max(), 0.5)  # not trivially zero
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-5)
    # Control: expert buffers of C = max(int(64 * 0.5 / 4), 4) = 8 slots for 64 tokens x 2
    # choices drop tokens, and a dropped token's FFN output is missing: the logits move.
    dropping = logits(["st_moe_tiny.gin", "cpu.gin"],
                      LAYERS + NOTHING_DROPPED + ["capacity_factor_eval = 0.5"], self.up, inputs,
                      targets)
    self.assertGreater(np.abs(dropping - dense).max(), 1e-3)

  def test_checkpoint_holds_copies_tiled_experts_a_fresh_router_and_a_zero_extra_output(self):
    dense_ffn = "encoder/block_001/layer_001/DenseReluDense/"
    sparse = "encoder/block_001/sparse_ffn/"
    extra = "encoder/block_001/extra_dense_ffn_after/"
    for w in ("wi_0", "wi_1", "wo"):
      experts = _read(self.up, f"{sparse}SparseFFN/{w}/kernel")
      source = _read(self.dense, f"{dense_ffn}{w}/kernel")
      self.assertEqual(experts.shape, (4,) + source.shape, w)
      for e in range(4):
        np.testing.assert_array_equal(experts[e], source, err_msg=f"{w} expert {e}")
    for w in ("wi_0", "wi_1"):
      np.testing.assert_array_equal(_read(self.up, f"{extra}DenseReluDense/{w}/kernel"),
                                    _read(self.dense, f"{dense_ffn}{w}/kernel"))
    np.testing.assert_array_equal(_read(self.up, f"{extra}DenseReluDense/wo/kernel"),
                                  np.zeros((64, 32)))
    np.testing.assert_array_equal(_read(self.up, f"{sparse}rms_norm/scale"),
                                  _read(self.dense, "encoder/block_001/layer_001/rms_norm/scale"))
    router = _read(self.up, f"{sparse}SparseFFN/router/kernel")
    self.assertEqual(router.shape, (32, 4))
    self.assertBetween(float(router.std()), 0.014, 0.026)  # normal(0, 2e-2), 128 draws
    # Renamed, not renumbered: the decoder's encoder-decoder attention of block 1.
    np.testing.assert_array_equal(
        _read(self.up, "decoder/block_001/enc_dec_attention/EncDecAttention/k"),
        _read(self.dense, "decoder/block_001/layer_001/EncDecAttention/k"))
    np.testing.assert_array_equal(
        _read(self.up, "decoder/block_000/self_attention/SelfAttention/relative_attention_bias"),
        _read(self.dense, "decoder/block_000/layer_000/SelfAttention/relative_attention_bias"))
    # Adafactor slots (unfactored at these sizes): tiled with their variables; the step kept.
    slot = _read(self.up, f"{sparse}SparseFFN/wo/kernel_slot_v")
    for e in range(4):
      np.testing.assert_array_equal(slot[e], _read(self.dense, f"{dense_ffn}wo/kernel_slot_v"))
    reader = tf.train.load_checkpoint(self.up)
    self.assertEqual(int(reader.get_tensor("global_step")), DENSE_STEPS)
    self.assertFalse(reader.has_tensor(f"{sparse}SparseFFN/router/kernel_slot_v"))
    self.assertIn(f"wrote {self.up} (global step {DENSE_STEPS})", self.upcycle_log)
    with open(os.path.join(self.up_dir, "upcycle.json")) as f:
      record = {v["name"]: v for v in json.load(f)["variables"]}
    self.assertEqual(record[f"{sparse}SparseFFN/wi_0/kernel"]["source"],
                     f"{dense_ffn}wi_0/kernel")

  def test_mismatched_d_ff_fails_naming_the_variable_and_both_shapes_before_writing(self):
    out = os.path.join(self.tmp, "bad_d_ff")
    code, log = _run(_upcycle_command(self.dense, out, "d_ff = 128"), self.tmp)
    self.assertEqual(code, 1, log[-3000:])
    self.assertRegex(log, re.escape(
        "cannot upcycle encoder/block_000/dense_ffn/DenseReluDense/wi_0/kernel [32, 128] from "
        "encoder/block_000/layer_001/DenseReluDense/wi_0/kernel [32, 64]"))
    self.assertFalse(os.path.exists(out))

  def test_mismatched_heads_layers_and_vocabulary_fail_before_writing(self):
    out = os.path.join(self.tmp, "bad")
    cases = [
        (["num_heads = 4", "d_kv = 8"], VOCAB_SIZE,  # heads x d_kv equal: the bias tells
         "encoder/block_000/self_attention/SelfAttention/relative_attention_bias [4, 32] from "
         "encoder/block_000/layer_000/SelfAttention/relative_attention_bias [2, 32]"),
        (["num_layers = 6", "num_sparse_layers = 3"], VOCAB_SIZE,
         "the dense checkpoint has 2 blocks (decoder/block_NNN), the sparse model 6"),
        ([], 32100, "shared/embedding [32128, 32] from shared/embedding [384, 32]"),
    ]
    for params, vocab_size, message in cases:
      with self.subTest(params=params, vocab_size=vocab_size):
        with self.assertRaisesRegex(upcycling.UpcycleError, re.escape(message)):
          upcycling.upcycle(self.dense, ["st_moe_tiny.gin", "cpu.gin"], out,
                            gin_params=LAYERS + params, vocab_size=vocab_size)
        self.assertFalse(os.path.exists(out))

  def test_finetune_from_the_upcycled_checkpoint_runs_through_t5_mesh_transformer(self):
    self.finetune.wait(timeout=TIMEOUT)
    self.finetune_log.flush()
    with open(self.finetune_log.name) as f:
      log = f.read()
    self.assertEqual(self.finetune.returncode, 0, log[-5000:])
    self.assertIn(f"Initializing variables from {self.up}", log)
    final = os.path.join(self.finetune_dir, f"model.ckpt-{DENSE_STEPS + 2}")
    self.assertTrue(os.path.exists(final + ".index"), os.listdir(self.finetune_dir))
    self.assertNotRegex(log, r"Saving checkpoints for 0 into")  # step kept: starts at 2
    losses = [float(x) for x in re.findall(r"Loss for final step: ([0-9]+\.[0-9]+)", log)]
    self.assertTrue(losses and all(0.0 < x < 100.0 for x in losses), log[-3000:])
    # Started from the upcycled values: two Adafactor steps (relative updates ~1e-3 with
    # multiply_by_parameter_scale) move each tensor a little; a fresh initialisation would be
    # unrelated (relative distance ~1.4).
    for name in ("shared/embedding", "encoder/block_001/sparse_ffn/SparseFFN/router/kernel",
                 "decoder/block_001/sparse_ffn/SparseFFN/wi_0/kernel"):
      start, end = _read(self.up, name), _read(final, name)
      distance = np.linalg.norm(end - start) / np.linalg.norm(start)
      self.assertLess(distance, 0.05, name)


def _shape(*dims):
  return mtf.Shape([mtf.Dimension(n, s) for n, s in dims])


class PlanTest(absltest.TestCase):
  """plan() on hand-written variable lists: one encoder block, d_model 8, d_ff 16, 2 experts."""

  DENSE = {  # layers numbered the other way round from T5.1.1: the FFN first
      "encoder/block_000/layer_000/rms_norm/scale": [8],
      "encoder/block_000/layer_000/DenseReluDense/wi_0/kernel": [8, 16],
      "encoder/block_000/layer_000/DenseReluDense/wo/kernel": [16, 8],
      "encoder/block_000/layer_001/rms_norm/scale": [8],
      "encoder/block_000/layer_001/SelfAttention/q": [8, 8],
      "encoder/rms_norm/scale": [8],
      "shared/embedding": [128, 8],
      "global_step": [],
  }

  def _sparse(self):
    bf16 = tf.bfloat16
    return {
        "shared/embedding": (_shape(("vocab", 128), ("d_model", 8)), bf16),
        "encoder/block_000/self_attention/rms_norm/scale": (_shape(("d_model", 8)), bf16),
        "encoder/block_000/self_attention/SelfAttention/q":
            (_shape(("d_model", 8), ("heads", 8)), bf16),
        "encoder/block_000/sparse_ffn/rms_norm/scale": (_shape(("d_model", 8)), bf16),
        "encoder/block_000/sparse_ffn/SparseFFN/router/kernel":
            (_shape(("d_model", 8), ("experts_unsplit", 2)), tf.float32),
        "encoder/block_000/sparse_ffn/SparseFFN/wi_0/kernel":
            (_shape(("experts", 2), ("d_model", 8), ("expert_hidden", 16)), bf16),
        "encoder/block_000/sparse_ffn/SparseFFN/wo/kernel":
            (_shape(("experts", 2), ("expert_hidden", 16), ("d_model", 8)), bf16),
        "encoder/block_000/extra_dense_ffn_after/rms_norm/scale": (_shape(("d_model", 8)), bf16),
        "encoder/block_000/extra_dense_ffn_after/DenseReluDense/wi_0/kernel":
            (_shape(("d_model", 8), ("d_ff", 16)), bf16),
        "encoder/block_000/extra_dense_ffn_after/DenseReluDense/wo/kernel":
            (_shape(("d_ff", 16), ("d_model", 8)), bf16),
        "encoder/rms_norm/scale": (_shape(("d_model", 8)), bf16),
    }

  STDDEVS = {"encoder/block_000/sparse_ffn": 0.02}

  def test_sub_layers_are_matched_by_class_not_by_number(self):
    plan = upcycling.plan(self.DENSE, self._sparse(), self.STDDEVS, optimizer_slots="drop",
                          dense_step=7)
    got = {e.name: (e.how, e.source) for e in plan.entries}
    ffn, attn = "encoder/block_000/layer_000/", "encoder/block_000/layer_001/"
    self.assertEqual(got, {
        "shared/embedding": ("copy", "shared/embedding"),
        "encoder/block_000/self_attention/rms_norm/scale": ("copy", attn + "rms_norm/scale"),
        "encoder/block_000/self_attention/SelfAttention/q": ("copy", attn + "SelfAttention/q"),
        "encoder/block_000/sparse_ffn/rms_norm/scale": ("copy", ffn + "rms_norm/scale"),
        "encoder/block_000/sparse_ffn/SparseFFN/router/kernel": ("router", None),
        "encoder/block_000/sparse_ffn/SparseFFN/wi_0/kernel":
            ("tile", ffn + "DenseReluDense/wi_0/kernel"),
        "encoder/block_000/sparse_ffn/SparseFFN/wo/kernel":
            ("tile", ffn + "DenseReluDense/wo/kernel"),
        "encoder/block_000/extra_dense_ffn_after/rms_norm/scale": ("copy", ffn + "rms_norm/scale"),
        "encoder/block_000/extra_dense_ffn_after/DenseReluDense/wi_0/kernel":
            ("copy", ffn + "DenseReluDense/wi_0/kernel"),
        "encoder/block_000/extra_dense_ffn_after/DenseReluDense/wo/kernel":
            ("zeros", ffn + "DenseReluDense/wo/kernel"),
        "encoder/rms_norm/scale": ("copy", "encoder/rms_norm/scale"),
    })
    self.assertEqual(plan.step, 7)
    router = [e for e in plan.entries if e.how == "router"][0]
    self.assertEqual((router.stddev, router.dtype), (0.02, tf.float32))

  def test_copy_policy_and_step_reset(self):
    plan = upcycling.plan(self.DENSE, self._sparse(), self.STDDEVS, optimizer_slots="drop",
                          extra_dense_ffn="copy", step=0, dense_step=7)
    got = {e.name: e.how for e in plan.entries}
    self.assertEqual(got["encoder/block_000/extra_dense_ffn_after/DenseReluDense/wo/kernel"],
                     "copy")
    self.assertEqual(plan.step, 0)

  def test_an_unused_dense_variable_fails(self):
    dense = dict(self.DENSE, **{"encoder/block_000/layer_000/DenseReluDense/wi_1/kernel": [8, 16]})
    with self.assertRaisesRegex(upcycling.UpcycleError,
                                "no place for: .*layer_000/DenseReluDense/wi_1/kernel"):
      upcycling.plan(dense, self._sparse(), self.STDDEVS, optimizer_slots="drop")

  def test_bad_settings_name_the_setting_and_the_choices(self):
    with self.assertRaisesRegex(upcycling.UpcycleError,
                                r"extra_dense_ffn='zero': expected one of \('identity', 'copy'\)"):
      upcycling.plan(self.DENSE, self._sparse(), self.STDDEVS, extra_dense_ffn="zero")
    with self.assertRaisesRegex(upcycling.UpcycleError, r"step=-1: expected 'keep' or an integer"):
      upcycling.plan(self.DENSE, self._sparse(), self.STDDEVS, optimizer_slots="drop", step=-1)

  def test_factored_slots_of_t5_1_1_large_sizes_tile_over_experts(self):
    # T5.1.1-Large's wi_0 [d_model 1024, d_ff 2816]: Adafactor factors over both dimensions,
    # vr [1024] (d_ff reduced) and vc [2816] (d_model reduced). An expert [32, 1024, 2816] is
    # factored over its two largest dimensions, expert_hidden and d_model: vr [32, 1024],
    # vc [32, 2816].
    name = "encoder/block_000/layer_000/DenseReluDense/wi_0/kernel"
    dense = {name: [1024, 2816], name + "_slot_vr": [1024], name + "_slot_vc": [2816],
             "encoder/block_000/layer_001/SelfAttention/q": [1024, 1024]}
    expert = "encoder/block_000/sparse_ffn/SparseFFN/wi_0/kernel"
    sparse = {
        "encoder/block_000/self_attention/SelfAttention/q":
            (_shape(("d_model", 1024), ("heads", 1024)), tf.bfloat16),
        expert: (_shape(("experts", 32), ("d_model", 1024), ("expert_hidden", 2816)),
                 tf.bfloat16),
    }
    plan = upcycling.plan(dense, sparse, {}, adafactor=optimize.AdafactorOptimizer())
    got = {e.name: (e.how, e.shape, e.source) for e in plan.entries if "_slot_" in e.name}
    self.assertEqual(got, {
        expert + "_slot_vr": ("tile", [32, 1024], name + "_slot_vr"),
        expert + "_slot_vc": ("tile", [32, 2816], name + "_slot_vc"),
    })


class T511LargeToStMoeLTest(absltest.TestCase):
  """The README's recipe: t5's own t5.1.1.large.gin onto st_moe_l.gin, from the built graphs."""

  SIZES = ("d_model", "d_ff", "num_heads", "d_kv", "num_layers")

  def test_same_backbone_sizes(self):
    # T5.1.1-Large (t5.1.1.large.gin; d_kv 64 from bi_bert_base.gin) and ST-MoE-L (paper Table 1).
    expected = {"d_model": 1024, "d_ff": 2816, "num_heads": 16, "d_kv": 64, "num_layers": 24}
    for files in (["models/t5.1.1.large.gin"], ["st_moe_l.gin"]):
      model_graph.parse_gin(files)
      self.assertEqual({k: model_graph.query(k) for k in self.SIZES}, expected, files)

  def test_24_layer_stacks_map_every_4th_ffn_to_experts(self):
    # The layer structure at small widths (names do not depend on them); every slot unfactored
    # (all dimensions below Adafactor's min_dim_size_to_factor = 128), so <name>_slot_v.
    small = ["d_model = 16", "d_ff = 32", "num_heads = 2", "d_kv = 8"]
    model_graph.parse_gin(["models/t5.1.1.large.gin"], small + FLOAT32)
    dense_graph = model_graph.build(vocab_size=32100, batch_size=2,
                                    sequence_length={"inputs": 8, "targets": 8}, mesh_shape="",
                                    layout_rules="")
    dense = {}
    for name, shape in dense_graph.variables.items():
      dense[name] = dense[name + "_slot_v"] = shape.to_integer_list
    dense["global_step"] = []
    variables, stddevs, adafactor = upcycling.sparse_variables(["st_moe_l.gin"], small + FLOAT32)
    plan = upcycling.plan(dense, variables, stddevs, adafactor, dense_step=1000000)
    # 2 stacks x 6 sparse layers: 3 expert kernels each, one router, one zero output kernel.
    counts = plan.counts()
    self.assertEqual((counts["tile"], counts["router"], counts["zeros"], counts["slot tile"]),
                     (36, 12, 12, 36))
    self.assertEqual(plan.step, 1000000)
    tiled = {e.name: e.source for e in plan.entries if e.how == "tile" and "_slot_" not in e.name}
    expected = {}
    for stack, ffn_layer in (("encoder", "layer_001"), ("decoder", "layer_002")):
      for block in (3, 7, 11, 15, 19, 23):  # 1-indexed 4, 8, ..., 24
        for w in ("wi_0", "wi_1", "wo"):
          expected[f"{stack}/block_{block:03d}/sparse_ffn/SparseFFN/{w}/kernel"] = (
              f"{stack}/block_{block:03d}/{ffn_layer}/DenseReluDense/{w}/kernel")
    self.assertEqual(tiled, expected)
    self.assertEqual(set(stddevs.values()), {2e-2})


if __name__ == "__main__":
  absltest.main()
