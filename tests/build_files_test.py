"""Keeps the Bazel BUILD files truthful: every module, tool and test belongs to a target.

Bazel cannot run offline on the project's machines, so nothing else would notice a BUILD file
drifting from the tree. BUILD files are Starlark, whose call syntax Python's parser reads.
"""
import ast
import os

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders whose .py files must be covered, and the rule kinds that may cover them.
COVERED = {
    "st_moe": ("py_library",),
    "tasks": ("py_library",),
    "tools": ("py_binary", "py_library"),
    "tests": ("py_test", "py_library"),
}


def build_targets(folder):
  """Returns {rule kind: [(name, [srcs])]} parsed from folder/BUILD."""
  path = os.path.join(REPO, folder, "BUILD")
  with open(path) as f:
    tree = ast.parse(f.read(), filename=path)
  targets = {}
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      continue
    kwargs = {k.arg: k.value for k in node.keywords}
    if "srcs" not in kwargs:
      continue
    srcs_node = kwargs["srcs"]
    if not isinstance(srcs_node, ast.List):
      raise AssertionError(f"{path}: srcs of {node.func.id} must be an explicit list, not "
                           f"{ast.unparse(srcs_node)}")
    srcs = [ast.literal_eval(e) for e in srcs_node.elts]
    name = ast.literal_eval(kwargs["name"])
    targets.setdefault(node.func.id, []).append((name, srcs))
  return targets


def python_files(folder):
  root = os.path.join(REPO, folder)
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "testdata", "data")]
    for name in filenames:
      if name.endswith(".py"):
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(found)


class BuildFilesTest(absltest.TestCase):

  def test_workspace_and_root_build_exist(self):
    for name in ("WORKSPACE", "BUILD"):
      self.assertTrue(os.path.isfile(os.path.join(REPO, name)), name)

  def test_every_python_file_is_in_a_target(self):
    for folder, kinds in COVERED.items():
      with self.subTest(folder=folder):
        targets = build_targets(folder)
        covered = {src for kind in kinds for _, srcs in targets.get(kind, []) for src in srcs}
        missing = [f for f in python_files(folder) if f not in covered]
        self.assertEmpty(missing, f"{folder}/BUILD does not cover {missing}")

  def test_every_listed_source_exists(self):
    for folder in COVERED:
      for kind, entries in build_targets(folder).items():
        for name, srcs in entries:
          for src in srcs:
            self.assertTrue(os.path.isfile(os.path.join(REPO, folder, src)),
                            f"{folder}/BUILD {kind} {name} lists missing {src}")

  def test_each_test_file_has_its_own_py_test(self):
    tests = dict(build_targets("tests").get("py_test", []))
    for f in python_files("tests"):
      if f.endswith("_test.py"):
        name = f[:-len(".py")]
        self.assertIn(name, tests, f"tests/BUILD has no py_test named {name}")
        self.assertIn(f, tests[name])


if __name__ == "__main__":
  absltest.main()
