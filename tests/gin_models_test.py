"""The gin files: every model builds, the checkpoint layout is pinned, runs and layouts say what
they need, and our bare names shadow t5's / mesh_tensorflow's only where that is safe.

Graphs are built with st_moe.analysis.model_graph (mtf graph, never lowered): seconds even for 269B params.
Regenerate the golden file with ST_MOE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/gin_models_test.py
after a deliberate checkpoint-layout change.
"""
import json
import os
import re

from absl.testing import absltest
import gin
from gin import config as gin_config

from st_moe.analysis import model_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, "gin")
GOLDEN = os.path.join(REPO, "tests", "testdata", "st_moe_tiny_variables.json")
MODELS = sorted(f for f in os.listdir(os.path.join(GIN_DIR, "models")) if f.endswith(".gin"))
# Tiny sizes valid for every model file (the macros of a dense file that it does not use are inert).
TINY = ["d_model = 16", "d_ff = 32", "num_heads = 2", "d_kv = 8", "num_layers = 4",
        "num_sparse_layers = 2", "num_experts = 4", "group_size = 32",
        "expert_d_ff = 32"]  # st_moe_small.gin sizes its experts apart from d_ff
FLOAT32 = ['utils.get_variable_dtype.activation_dtype = "float32"']
SMALL_BATCH = dict(batch_size=2, sequence_length={"inputs": 16, "targets": 8})


def _gin_files(folder):
  root = os.path.join(GIN_DIR, folder)
  return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".gin"))


def _relative_gin_names(root):
  """Every path a gin include/--gin_file could name relative to `root` (a search-path entry)."""
  names = set()
  for dirpath, _, filenames in os.walk(root):
    for f in filenames:
      if f.endswith(".gin"):
        names.add(os.path.relpath(os.path.join(dirpath, f), root))
  return names


class GinModelsTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_every_model_file_parses_finalizes_and_builds_tiny(self):
    self.assertContainsSubset(
        {"st_moe_32b.gin", "st_moe_l.gin", "dense_32b.gin", "dense_l.gin", "st_moe_tiny.gin",
         "dense_tiny.gin"}, set(MODELS))
    for name in MODELS:
      with self.subTest(model=name):
        model_graph.parse_gin([name], TINY + FLOAT32, finalize=True)
        graph = model_graph.build(**SMALL_BATCH)
        self.assertEqual(graph.loss.shape.size, 1)
        counts = model_graph.count(graph)
        self.assertEqual(counts.params["embeddings"], 2 * 32128 * 16, name)  # shared in + logits
        sparse = counts.params["experts"] > 0
        self.assertEqual(sparse, name.startswith("st_moe_") and name != "st_moe_common.gin", name)
        if sparse:
          # 2 sparse layers per stack x 2 stacks x 4 experts x GEGLU (3 matrices of 16 x 32).
          self.assertEqual(counts.params["experts"], 2 * 2 * 4 * 3 * 16 * 32, name)
        gin.clear_config()

  def test_sparse_placement_every_4th_with_extra_dense_ffn_after(self):
    model_graph.parse_gin(["st_moe_l.gin"], FLOAT32 + ["d_model = 16", "d_ff = 32",
                                                      "num_heads = 2", "d_kv = 8"])
    graph = model_graph.build(**SMALL_BATCH)
    for stack in ("encoder", "decoder"):
      blocks = {}
      for name in graph.variables:
        m = re.match(stack + r"/block_(\d+)/([a-z_]+)/", name)
        if m:
          blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
      self.assertLen(blocks, 24)
      sparse = sorted(i + 1 for i, layers in blocks.items() if "sparse_ffn" in layers)
      self.assertEqual(sparse, [4, 8, 12, 16, 20, 24], stack)  # 1-indexed
      for i, layers in blocks.items():
        expected = {"self_attention"} | ({"enc_dec_attention"} if stack == "decoder" else set())
        expected |= ({"sparse_ffn", "extra_dense_ffn_after"} if i + 1 in sparse else
                     {"dense_ffn"})
        self.assertEqual(layers, expected, (stack, i))

  def test_paper_settings_are_bound(self):
    model_graph.parse_gin(["st_moe_32b.gin"])
    q = model_graph.query
    self.assertEqual(
        (q("d_model"), q("d_ff"), q("num_heads"), q("d_kv"), q("num_layers"), q("num_experts"),
         q("group_size")), (5120, 20480, 64, 128, 24, 64, 4096))
    self.assertEqual(q("st_moe.SparseFFN.num_selected_experts"), 2)
    self.assertEqual(q("st_moe.SparseFFN.capacity_factor_train"), 1.25)
    self.assertEqual(q("st_moe.SparseFFN.capacity_factor_eval"), 2.0)
    self.assertEqual(q("st_moe.SparseFFN.router_z_loss_coef"), 1e-3)
    self.assertEqual(q("st_moe.SparseFFN.balance_loss_coef"), 1e-2)
    self.assertEqual(q("st_moe.SparseFFN.router_init_stddev"), 2e-2)
    self.assertEqual(q("st_moe.SparseFFN.router_jitter_eps"), 0.0)
    self.assertFalse(q("st_moe.SparseFFN.capacity_multiply_by_k"))
    self.assertFalse(q("st_moe.SparseFFN.batch_prioritized_routing"))
    self.assertEqual(tuple(q("st_moe.SparseFFN.activation")), ("gelu", "linear"))
    self.assertEqual(list(q("DenseReluDense.activation")), ["gelu", "linear"])
    self.assertEqual(q("mesh_tensorflow.layers.VarianceScalingInitializer.scale"), 0.1)
    self.assertEqual(q("dropout_rate"), 0.0)
    self.assertFalse(q("Unitransformer.shared_embedding_and_softmax_weights"))
    self.assertEqual(q("SelfAttention.relative_attention_type"), "bias_shared")
    self.assertEqual(q("Unitransformer.z_loss"), 1e-4)
    gin.clear_config()
    model_graph.parse_gin(["st_moe_l.gin"])
    self.assertEqual(
        (q("d_model"), q("d_ff"), q("num_heads"), q("d_kv"), q("num_layers"), q("num_experts"),
         q("group_size")), (1024, 2816, 16, 64, 24, 32, 1024))

  def test_dense_baselines_share_their_sparse_models_sizes_but_d_ff(self):
    q = model_graph.query
    for sparse, dense in (("st_moe_l.gin", "dense_l.gin"), ("st_moe_32b.gin", "dense_32b.gin"),
                          ("st_moe_tiny.gin", "dense_tiny.gin")):
      model_graph.parse_gin([sparse])
      s = {k: q(k) for k in ("d_model", "d_ff", "num_heads", "d_kv", "num_layers")}
      per_stack_ffns = s["num_layers"] + 2 * q("num_sparse_layers")  # k=2 experts + extra dense
      gin.clear_config()
      model_graph.parse_gin([dense])
      d = {k: q(k) for k in ("d_model", "d_ff", "num_heads", "d_kv", "num_layers")}
      gin.clear_config()
      self.assertEqual({k: v for k, v in s.items() if k != "d_ff"},
                       {k: v for k, v in d.items() if k != "d_ff"}, dense)
      self.assertEqual(d["d_ff"] * d["num_layers"], s["d_ff"] * per_stack_ffns, dense)

  def test_st_moe_tiny_checkpoint_layout_matches_golden(self):
    model_graph.parse_gin(["st_moe_tiny.gin"], FLOAT32)
    shapes = model_graph.variable_shapes(model_graph.build(**SMALL_BATCH))
    if os.environ.get("ST_MOE_UPDATE_GOLDEN"):
      os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
      with open(GOLDEN, "w") as f:
        json.dump(shapes, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(GOLDEN) as f:
      golden = json.load(f)
    self.assertEqual(sorted(shapes), sorted(golden), "variable names changed (checkpoint layout)")
    for name, dims in golden.items():
      self.assertEqual(shapes[name], dims, name)

  def test_bfloat16_activations_build(self):
    # The model files ask for bfloat16 activations, as on TPU: every loss entry must match them.
    model_graph.parse_gin(["st_moe_tiny.gin"])
    self.assertEqual(model_graph.query("utils.get_variable_dtype.activation_dtype"), "bfloat16")
    graph = model_graph.build(**SMALL_BATCH)
    self.assertEqual(graph.loss.dtype.name, "bfloat16")

  def test_missing_size_is_a_clear_error(self):
    model_graph.parse_gin(["st_moe_sparse_common.gin"],
                          [s for s in TINY if "num_experts" not in s] + FLOAT32)
    # num_experts is gin.REQUIRED in st_moe_sparse_common.gin; the layer refuses it by name.
    with self.assertRaisesRegex(ValueError, r"num_experts=.*must be an integer >= 1"):
      model_graph.build(**SMALL_BATCH)

  def test_every_gin_file_opens_with_provides_and_requires(self):
    for folder in ("models", "layouts", "runs"):
      for path in _gin_files(folder):
        with open(path) as f:
          header = []
          for line in f:
            if not line.startswith("#"):
              break
            header.append(line)
        header = "".join(header)
        self.assertIn("# Provides:", header, path)
        self.assertIn("# Requires:", header, path)

  def test_layouts_bind_mesh_rules_and_dispatch_only(self):
    for path in _gin_files("layouts"):
      with open(path) as f:
        lines = [l for l in f if l.strip() and not l.startswith(("#", "import "))]
      bindings = {k.strip(): v.strip() for k, v in (l.split("=", 1) for l in lines)}
      cpu = os.path.basename(path) == "cpu.gin"
      # A CPU run also leaves its graph out of the model folder (st_moe/graph_files.py) and builds
      # its input pipeline without AutoGraph (st_moe/cpu_startup.py).
      cpu_only = ["st_moe.cpu_startup.autograph_input", "st_moe.graph_files.write"]
      expected_names = ["st_moe.SparseFFN.dispatch"] + (cpu_only if cpu else []) + [
          "utils.run.layout_rules", "utils.run.mesh_shape"]
      self.assertEqual(sorted(bindings), expected_names, path)
      # The one-hot einsum dispatch on TPU (dense matrix products), gather on CPU.
      self.assertEqual(bindings["st_moe.SparseFFN.dispatch"], '"gather"' if cpu else '"einsum"',
                       path)
      if cpu:
        self.assertEqual(bindings["st_moe.graph_files.write"], "False")

  def test_bare_name_collisions_with_t5_and_mesh_tensorflow(self):
    ours = set()
    from st_moe import gin_paths  # pylint: disable=g-import-not-at-top
    for path in gin_paths.search_paths():
      ours |= _relative_gin_names(path)
    theirs = _relative_gin_names(model_graph.t5_gin_dir())
    theirs |= _relative_gin_names(os.path.dirname(model_graph.mtf_defaults_gin()))
    # eval.gin shadows t5's on purpose (the issue names it); test_eval_gin_does_what_t5s_does.
    self.assertEqual(ours & theirs, {"eval.gin"})

  def test_eval_gin_does_what_t5s_does(self):
    def bindings(eval_path):
      model_graph.parse_gin(["st_moe_tiny.gin", "cpu.gin", "dataset.gin", eval_path])
      # gin's own table of bindings: {(scope, selector): {param: value}}.
      table = {(k, p): repr(v) for k, params in gin_config._CONFIG.items()
               for p, v in params.items()}
      gin.clear_config()
      return table

    t5_eval = os.path.join(model_graph.t5_gin_dir(), "eval.gin")
    theirs = bindings(t5_eval)
    ours = bindings(os.path.join(GIN_DIR, "runs", "eval.gin"))
    model_only = bindings(os.path.join(GIN_DIR, "layouts", "cpu.gin"))  # without any eval file
    t5_set = {k: v for k, v in theirs.items() if model_only.get(k) != v}
    self.assertNotEmpty(t5_set)
    for key, value in t5_set.items():
      self.assertEqual(ours.get(key), value, key)
    self.assertEqual(ours[(("capacity_factor_eval", "gin.macro"), "value")], "2.0")
    # t5's score_eval.gin includes 'eval.gin': it must get ours and still parse.
    model_graph.parse_gin(["st_moe_tiny.gin", "cpu.gin", "dataset.gin", "score_eval.gin"])
    self.assertEqual(model_graph.query("utils.run.mode"), "score_eval")
    self.assertEqual(model_graph.query("capacity_factor_eval"), 2.0)

  def test_runs_parse_and_state_their_requirements(self):
    base = ["st_moe_tiny.gin", "cpu.gin"]
    q = model_graph.query
    model_graph.parse_gin(base + ["pretrain_c4.gin"])
    self.assertEqual(repr(q("utils.run.train_steps")), "%gin.REQUIRED")
    with self.assertRaisesRegex(ValueError, "train_steps"):
      gin.finalize()
    gin.clear_config()
    model_graph.parse_gin(base + ["pretrain_c4.gin"], ["utils.run.train_steps = 10"], finalize=True)
    self.assertEqual(q("utils.run.sequence_length"), {"inputs": 512, "targets": 114})
    self.assertEqual(q("MIXTURE_NAME"), "st_moe_pretrain")
    import seqio  # pylint: disable=g-import-not-at-top
    self.assertIn(q("MIXTURE_NAME"), seqio.MixtureRegistry.names())  # registered by import st_moe.register
    self.assertEqual(q("learning_rate_schedules.learning_rate_schedule_noam.warmup_steps"), 10000)
    self.assertEqual(q("learning_rate_schedules.learning_rate_schedule_noam.linear_decay_fraction"),
                     0.0)
    self.assertEqual(q("optimize.AdafactorOptimizer.clipping_threshold"), 1.0)
    self.assertEqual(q("optimize.adafactor_decay_rate_pow.exponent"), 0.8)
    gin.clear_config()
    model_graph.parse_gin(base + ["finetune.gin"])
    self.assertEqual(q("learning_rate_schedules.constant_learning_rate.learning_rate"), 1e-3)
    self.assertEqual(q("dropout_rate"), 0.1)
    self.assertEqual(q("expert_dropout_rate"), 0.1)
    self.assertEqual(q("st_moe.SparseFFN.expert_dropout_rate"), 0.1)
    for required in ("MIXTURE_NAME", "utils.run.init_checkpoint", "utils.run.train_steps"):
      self.assertEqual(repr(q(required)), "%gin.REQUIRED", required)
    gin.clear_config()
    model_graph.parse_gin(base + ["finetune.gin"], [
        "MIXTURE_NAME = 'a_task'", "utils.run.init_checkpoint = '/ckpt/model.ckpt-1'",
        "utils.run.train_steps = 10"], finalize=True)
    gin.clear_config()
    model_graph.parse_gin(base + ["dataset.gin", "eval.gin"], ["capacity_factor_eval = 4.0"])
    self.assertEqual(q("st_moe.SparseFFN.capacity_factor_eval"), 4.0)
    self.assertEqual(q("utils.run.mode"), "eval")

  def test_stability_small_is_bfloat16_with_a_warmed_up_constant_learning_rate(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    model_graph.parse_gin(["dataset.gin", "st_moe_small.gin", "cpu.gin", "stability_small.gin"])
    q = model_graph.query
    self.assertEqual(q("st_moe.SparseFFN.router_precision"), "bfloat16")
    self.assertEqual(q("utils.get_variable_dtype.activation_dtype"), "bfloat16")
    from mesh_tensorflow.transformer import learning_rate_schedules  # pylint: disable=g-import-not-at-top
    self.assertEqual(q("utils.run.learning_rate_schedule").configurable.name,
                     "product_learning_rate")
    gin.finalize()
    # By hand: 0.02 x min(1, step / 100).
    for step, want in ((1, 0.0002), (50, 0.01), (100, 0.02), (300, 0.02)):
      got = float(learning_rate_schedules.product_learning_rate(tf.constant(step, tf.int64), 300))
      self.assertAlmostEqual(got, want, places=7, msg=f"step {step}")

  def test_finetune_variable_filters_split_moe_from_the_rest(self):
    model_graph.parse_gin(["st_moe_tiny.gin", "cpu.gin", "finetune.gin"], FLOAT32)
    freeze_moe = re.compile(model_graph.query("FREEZE_MOE"))
    only_moe = re.compile(model_graph.query("ONLY_MOE"))
    names = list(model_graph.build(**SMALL_BATCH).variables)
    # Written out from st_moe_tiny's architecture: blocks 1 and 3 (0-indexed) of each stack are
    # sparse, and each sparse layer has its pre-norm, router and three GEGLU expert kernels.
    expected_moe = {f"{stack}/block_{block:03d}/sparse_ffn/{suffix}"
                    for stack in ("encoder", "decoder") for block in (1, 3)
                    for suffix in ("rms_norm/scale", "SparseFFN/router/kernel",
                                   "SparseFFN/wi_0/kernel", "SparseFFN/wi_1/kernel",
                                   "SparseFFN/wo/kernel")}
    self.assertContainsSubset(expected_moe, set(names))
    # mesh_tensorflow trains a variable iff re.search(filter, name).
    self.assertEqual({n for n in names if only_moe.search(n)}, expected_moe)
    self.assertEqual({n for n in names if freeze_moe.search(n)}, set(names) - expected_moe)
    self.assertIn("encoder/block_001/extra_dense_ffn_after/DenseReluDense/wi_0/kernel",
                  set(names) - expected_moe)  # the extra dense FFN is not part of the MoE layer


if __name__ == "__main__":
  absltest.main()
