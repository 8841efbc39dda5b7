"""The package imports, registers its gin search path, and the installed toolchain runs.

These are the foundation's checks: the environment the lock installs is usable, and what
`pip install .` ships contains the gin files and the tasks subpackage.
"""
import os
import subprocess
import sys
import tempfile
import zipfile

from absl.testing import absltest
import gin

from st_moe import gin_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


class PackageTest(absltest.TestCase):

  def test_bare_model_name_resolves_through_gin(self):
    gin.clear_config()
    self.addCleanup(gin.clear_config)
    gin.parse_config_file("st_moe_32b.gin", skip_unknown=True)  # found by bare name
    self.assertEqual(gin.query_parameter("%num_experts"), 64)

  def test_gin_reader_resolves_ours_first_then_t5s(self):
    self.assertTrue(os.path.isdir(gin_paths.gin_dir()), gin_paths.gin_dir())
    # Ours by bare name in each subfolder; t5's by bare name; ours shadows t5's eval.gin.
    self.assertEqual(gin_paths.resolve("st_moe_32b.gin"),
                     os.path.join(REPO, "gin", "models", "st_moe_32b.gin"))
    self.assertEqual(gin_paths.resolve("cpu.gin"), os.path.join(REPO, "gin", "layouts", "cpu.gin"))
    self.assertEqual(gin_paths.resolve("eval.gin"), os.path.join(REPO, "gin", "runs", "eval.gin"))
    import t5  # pylint: disable=g-import-not-at-top
    self.assertEqual(gin_paths.resolve("dataset.gin"),
                     os.path.join(os.path.dirname(t5.__file__), "models", "gin", "dataset.gin"))
    self.assertIsNone(gin_paths.resolve("no_such_file.gin"))
    self.assertIsNone(gin_paths.resolve("/abs/st_moe_32b.gin"))

  def test_start_up_hook_registers_reader_without_importing_tf_or_gin(self):
    # A fresh interpreter of the venv: the .pth installed the hook; nothing heavy is imported at
    # start-up; importing gin (and only that) puts our reader first.
    code = ("import sys; before = sorted(m for m in ('gin', 'tensorflow', 'st_moe.register') "
            "if m in sys.modules); import gin; "
            "print(before, gin.config._FILE_READERS[0][0].__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir()).stdout.strip().splitlines()[-1]
    self.assertEqual(out, "[] st_moe.gin_paths")

  def test_importing_a_model_module_registers_nothing_process_wide(self):
    code = ("import sys; import tensorflow.compat.v1 as tf; tf.disable_v2_behavior(); "
            "import st_moe.routing, st_moe.layers; import seqio; "
            "print(tf.resource_variables_enabled(), 'st_moe.tasks' in sys.modules, "
            "'t5' in sys.modules, any(n.startswith('st_moe_') for n in seqio.TaskRegistry.names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()[-4:]
    self.assertEqual(out, ["False", "False", "False", "False"])

  def test_resource_variables_back_on_after_disable_v2_behavior(self):
    code = ("import os, sys; import tensorflow.compat.v1 as tf; tf.disable_v2_behavior(); "
            "before = tf.resource_variables_enabled(); import st_moe.register; "
            "print(before, tf.resource_variables_enabled(), "
            "type(tf.get_variable('v', [1])).__name__)")
    def run(env):
      return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, **env), check=True).stdout.split()[-3:]
    self.assertEqual(run({"ST_MOE_REF_VARIABLES": "0"}),
                     ["False", "True", "ResourceVariable"])
    self.assertEqual(run({"ST_MOE_REF_VARIABLES": "1"}), ["False", "False", "RefVariable"])

  def test_tasks_subpackage_imports_from_tasks_folder(self):
    import st_moe.tasks  # pylint: disable=g-import-not-at-top
    self.assertEqual(os.path.realpath(os.path.dirname(st_moe.tasks.__file__)),
                     os.path.realpath(os.path.join(REPO, "tasks")))

  def test_t5_mesh_transformer_helpfull_runs(self):
    exe = os.path.join(VENV_BIN, "t5_mesh_transformer")
    self.assertTrue(os.path.exists(exe), exe)
    proc = subprocess.run([exe, "--helpfull"], capture_output=True, text=True, timeout=300)
    # absl's --helpfull prints the usage to stdout and exits with status 1 by design; an import
    # failure also exits 1, but prints a traceback and no usage.
    self.assertIn(proc.returncode, (0, 1), proc.stderr[-3000:])
    self.assertNotIn("Traceback", proc.stderr, proc.stderr[-3000:])
    for flag in ("--module_import", "--gin_file", "--model_dir", "--tpu", "--gin_param"):
      self.assertIn(flag, proc.stdout)

  def test_wheel_ships_gin_files_and_tasks_but_no_top_level_gin(self):
    with tempfile.TemporaryDirectory() as tmp:
      proc = subprocess.run(
          [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--quiet", "-w", tmp, REPO],
          capture_output=True, text=True, timeout=300)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
      self.assertLen(wheels, 1)
      names = zipfile.ZipFile(os.path.join(tmp, wheels[0])).namelist()
    top_levels = {n.split("/")[0] for n in names}
    self.assertNotIn("gin", top_levels)
    self.assertNotIn("tasks", top_levels)
    self.assertIn("st_moe/__init__.py", names)
    self.assertIn("st_moe/tasks/__init__.py", names)
    repo_gins = sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(REPO, "gin"))
        for d, _, fs in os.walk(os.path.join(REPO, "gin")) for f in fs if f.endswith(".gin"))
    self.assertIn("models/st_moe_32b.gin", repo_gins)
    self.assertIn("st_moe/tasks/data/pydoc_topics_2k.model", names)
    shipped = sorted(n[len("st_moe/gin/"):] for n in names
                     if n.startswith("st_moe/gin/") and n.endswith(".gin"))
    self.assertEqual(shipped, repo_gins)


if __name__ == "__main__":
  absltest.main()
