"""tools/plan_mesh.py and st_moe.analysis.planning: layouts that split the models evenly, per-core bytes.

Per-core parameter bytes are checked against a hand split of the counted parameters; Adafactor's
slot shapes against mesh_tensorflow's own AdafactorOptimizer; wrong layouts must fail naming the
dimension. Activations float32 (tests/gin_models_test.py covers the bfloat16 build).
"""
import json
import os
import subprocess
import sys

from absl.testing import absltest
import gin
import mesh_tensorflow as mtf

from st_moe.analysis import model_graph
from st_moe.analysis import planning
from st_moe import routing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT32 = ['utils.get_variable_dtype.activation_dtype = "float32"']


def _plan(files, params=(), core_memory_gib=16.0, batch_size=None):
  model_graph.parse_gin(files, FLOAT32 + list(params))
  try:
    mesh_shape, layout_rules = model_graph.gin_mesh_and_layout()
    lengths = model_graph.query("utils.run.sequence_length")
    batch, micro = planning.run_batch(lengths, mesh_shape, layout_rules, batch_size)
    graph = model_graph.build(batch_size=batch // micro, sequence_length=lengths)
    return planning.plan(graph, batch, micro, core_memory_gib), model_graph.count(graph), graph
  finally:
    gin.clear_config()


def _run_tool(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_mesh.py"), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                        check=False)


class PlanMeshTest(absltest.TestCase):

  def test_st_moe_32b_on_64x16_one_expert_per_core(self):
    plan, counts, graph = _plan(
        ["st_moe_32b.gin", "tpu_v3_1024_dp64_mp16.gin", "pretrain_c4.gin"],
        ["utils.run.train_steps = 1"])
    self.assertEqual(plan.num_cores, 1024)
    self.assertEqual((plan.num_experts, plan.experts_per_core, plan.experts_split_over),
                     (64, 1, "batch"))
    self.assertEqual(plan.batch_size, 2048)  # 2^20 tokens / 512
    self.assertEqual(plan.batch_size, plan.num_microbatches * plan.microbatch_size)
    # The paper's routing groups of 4096 tokens: a replica's encoder microbatch holds 4096 tokens
    # (8 x 512); its decoder microbatch, 8 x 114 tokens, is one group.
    def groups(stack):
      return {d.size for t in graph.activations() if t.name.startswith(stack)
              for d in t.shape.dims if d.name == routing.GROUP_DIM_NAME}
    self.assertEqual(groups("encoder/"), {4096})
    self.assertEqual(groups("decoder/"), {8 * 114})
    p = counts.params
    # heads, d_ff, expert_hidden and vocab split 16 ways; experts 64 x 16 ways; norms and router
    # replicated. float32 slices.
    expected = 4 * ((p["attention"] + p["dense_ffn"] + p["embeddings"]) // 16
                    + p["experts"] // 1024 + p["router"] + p["layer_norm"])
    self.assertEqual(plan.param_bytes, expected)
    self.assertTrue(plan.fits, plan)
    self.assertEqual(plan.total_bytes, 2 * plan.param_bytes + plan.adafactor_bytes
                     + plan.largest_activation_bytes)
    small = planning.plan(graph, plan.batch_size, plan.num_microbatches, core_memory_gib=4.0)
    self.assertFalse(small.fits, small)

  def test_st_moe_l_on_32_cores(self):
    plan, counts, _ = _plan(["st_moe_l.gin", "tpu_v3_32_dp32.gin"])
    self.assertEqual((plan.experts_per_core, plan.experts_split_over), (1, "batch"))
    p = counts.params
    self.assertEqual(plan.param_bytes, 4 * (counts.total_params - p["experts"]
                                            + p["experts"] // 32))
    self.assertTrue(plan.fits)

  def test_adafactor_slots_match_mesh_tensorflow(self):
    opt = mtf.optimize.AdafactorOptimizer()
    shapes = [mtf.Shape([mtf.Dimension("experts", 64), mtf.Dimension("d_model", 512),
                         mtf.Dimension("expert_hidden", 2048)]),
              mtf.Shape([mtf.Dimension("d_model", 512), mtf.Dimension("experts_unsplit", 64)]),
              mtf.Shape([mtf.Dimension("d_model", 512)])]
    for shape in shapes:
      dims = opt._factored_dims(shape)  # pylint: disable=protected-access
      expected = [shape - dims[0], shape - dims[1]] if dims else [shape]
      self.assertEqual(planning.adafactor_state_shapes(shape), expected, shape)

  def test_experts_over_a_mesh_dimension_that_does_not_divide_them(self):
    with self.assertRaisesRegex(ValueError, r"num_experts=64 .*48.*'experts'"):
      _plan(["st_moe_32b.gin", "tpu_v3_1024_dp64_mp16.gin"],
            ['utils.run.mesh_shape = "batch:48,model:16"'], batch_size=96)

  def test_other_dimensions_are_named(self):
    with self.assertRaisesRegex(planning.LayoutError, r"dimension 'vocab' \(size 32128\).*"
                                r"mesh dimension 'model' of size 48"):
      _plan(["dense_32b.gin", "tpu_v3_1024_dp64_mp16.gin"],
            ['utils.run.mesh_shape = "batch:64,model:48"'], batch_size=64)
    with self.assertRaisesRegex(planning.LayoutError, r"dimension 'batch' \(size 100\)"):
      _plan(["dense_tiny.gin", "tpu_v3_32_dp32.gin"], batch_size=100)

  def test_command_line(self):
    out = _run_tool("--gin_file=st_moe_tiny.gin", "--gin_file=cpu.gin",
                    "--gin_param=" + FLOAT32[0], "--json")
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    self.assertEqual((plan["num_cores"], plan["num_experts"], plan["experts_per_core"]),
                     (1, 4, 4))
    self.assertTrue(plan["fits"])
    out = _run_tool("--gin_file=st_moe_tiny.gin", "--gin_file=cpu.gin",
                    "--gin_param=" + FLOAT32[0], '--gin_param=utils.run.mesh_shape = "batch:3"',
                    "--batch_size=6")
    self.assertEqual(out.returncode, 1, out.stdout)
    self.assertRegex(out.stderr, r"plan_mesh: error: num_experts=4 .*3.*'experts'")


if __name__ == "__main__":
  absltest.main()
