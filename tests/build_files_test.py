"""Keeps the Bazel BUILD files truthful: every module, tool and test belongs to a target, and every
target's deps cover what its sources import.

Bazel cannot run offline on the project's machines, so nothing else would notice a BUILD file
drifting from the tree. BUILD files are Starlark, whose call syntax Python's parser reads.

Deps are checked from the sources' own import statements (module level and inside functions):
  * a third-party import needs requirement("<distribution>") of the distribution that installs it,
    as the installed packages' metadata says (importlib.metadata, not a table kept here);
  * a project import (st_moe.*, st_moe.tasks.* -> tasks/, a tests/ helper module) needs the target
    whose srcs hold that file, or is in the same target;
  * the standard library needs nothing.
"""
import ast
import functools
import importlib.metadata
import os
import re
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders whose .py files must be covered, and the rule kinds that may cover them.
COVERED = {
    "st_moe": ("py_library",),
    "tasks": ("py_library",),
    "tools": ("py_binary", "py_library"),
    "tests": ("py_test", "py_library"),
}
LOCK = os.path.join(REPO, "requirements.lock")


def _label(node, folder):
  """A dep as written: "//pkg:name" / ":name" / "//pkg" -> "pkg:name"; requirement("x") -> "pip:x"."""
  if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "requirement":
    return "pip:" + _normalise(ast.literal_eval(node.args[0]))
  text = ast.literal_eval(node)
  if text.startswith(":"):
    return f"{folder}:{text[1:]}"
  text = text[2:] if text.startswith("//") else text
  if ":" not in text:
    text = f"{text}:{text.rsplit('/', 1)[-1]}"
  return text


def _normalise(distribution):
  return re.sub(r"[-_.]+", "-", distribution).lower()


def build_targets(folder):
  """Returns {rule kind: [(name, [srcs], [deps])]} parsed from folder/BUILD."""
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
    lists = {}
    for key in ("srcs", "deps"):
      value = kwargs.get(key, ast.List(elts=[]))
      if not isinstance(value, ast.List):
        raise AssertionError(f"{path}: {key} of {node.func.id} must be an explicit list, not "
                             f"{ast.unparse(value)}")
      lists[key] = value.elts
    srcs = [ast.literal_eval(e) for e in lists["srcs"]]
    deps = [_label(e, folder) for e in lists["deps"]]
    name = ast.literal_eval(kwargs["name"])
    targets.setdefault(node.func.id, []).append((name, srcs, deps))
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


def imported_modules(path):
  """Every module name an import statement of the file names (absolute imports)."""
  with open(path) as f:
    tree = ast.parse(f.read(), filename=path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
  return names


@functools.lru_cache(maxsize=None)
def _distributions():
  """{top-level import name: {normalised distribution names}} of the installed packages."""
  return {k: {_normalise(d) for d in v}
          for k, v in importlib.metadata.packages_distributions().items()}


def _project_file(module):
  """(folder, path inside it) of a project module's file, or None if it is not one of ours."""
  parts = module.split(".")
  if parts[0] == "st_moe":
    if len(parts) > 1 and parts[1] == "tasks":
      folder, rest = "tasks", parts[2:]
    else:
      folder, rest = "st_moe", parts[1:]
  elif os.path.isfile(os.path.join(REPO, "tests", parts[0] + ".py")):
    folder, rest = "tests", parts
  else:
    return None
  base = os.path.join(REPO, folder, *rest)
  if os.path.isfile(base + ".py"):
    return folder, os.path.relpath(base + ".py", os.path.join(REPO, folder))
  if os.path.isfile(os.path.join(base, "__init__.py")):
    return folder, os.path.relpath(os.path.join(base, "__init__.py"), os.path.join(REPO, folder))
  return ("missing", module)  # `from pkg import name` where name is not a module


def _owners():
  """{(folder, src): "folder:target"} over every BUILD file."""
  owners = {}
  for folder in COVERED:
    for entries in build_targets(folder).values():
      for name, srcs, _ in entries:
        for src in srcs:
          owners[(folder, src)] = f"{folder}:{name}"
  return owners


def required_deps(folder, src):
  """The labels a source's imports need ("pip:<dist>" or "folder:target")."""
  owners = _owners()
  needed = set()
  for module in imported_modules(os.path.join(REPO, folder, src)):
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
      continue
    project = _project_file(module)
    if project is not None:
      if project[0] != "missing":
        needed.add(owners.get(project, f"<no target holds {project[0]}/{project[1]}>"))
      continue
    dists = _distributions().get(top)
    if not dists:
      needed.add(f"<{module}: no installed distribution provides it>")
    elif not any(f"pip:{d}" in needed for d in dists):
      needed.add("pip:" + sorted(dists)[0] if len(dists) == 1 else
                 "pip:" + "|".join(sorted(dists)))
  return needed


class BuildFilesTest(absltest.TestCase):

  def test_workspace_and_root_build_exist(self):
    for name in ("WORKSPACE", "BUILD"):
      self.assertTrue(os.path.isfile(os.path.join(REPO, name)), name)

  def test_every_python_file_is_in_a_target(self):
    for folder, kinds in COVERED.items():
      with self.subTest(folder=folder):
        targets = build_targets(folder)
        covered = {src for kind in kinds for _, srcs, _ in targets.get(kind, []) for src in srcs}
        missing = [f for f in python_files(folder) if f not in covered]
        self.assertEmpty(missing, f"{folder}/BUILD does not cover {missing}")

  def test_every_listed_source_exists(self):
    for folder in COVERED:
      for kind, entries in build_targets(folder).items():
        for name, srcs, _ in entries:
          for src in srcs:
            self.assertTrue(os.path.isfile(os.path.join(REPO, folder, src)),
                            f"{folder}/BUILD {kind} {name} lists missing {src}")

  def test_each_test_file_has_its_own_py_test(self):
    tests = {name: srcs for name, srcs, _ in build_targets("tests").get("py_test", [])}
    for f in python_files("tests"):
      if f.endswith("_test.py"):
        name = f[:-len(".py")]
        self.assertIn(name, tests, f"tests/BUILD has no py_test named {name}")
        self.assertIn(f, tests[name])

  def test_deps_cover_every_import(self):
    with open(LOCK) as f:
      locked = {_normalise(l.split("==")[0]) for l in f if "==" in l and not l.startswith("#")}
    problems = []
    for folder in COVERED:
      for kind, entries in build_targets(folder).items():
        for name, srcs, deps in entries:
          label = f"{folder}:{name}"
          have = set(deps) | {label}
          for dep in deps:
            if dep.startswith("pip:") and dep[4:] not in locked:
              problems.append(f"{label}: requirement({dep[4:]!r}) is not in requirements.lock")
          for src in srcs:
            if not os.path.isfile(os.path.join(REPO, folder, src)):
              continue  # test_every_listed_source_exists names it
            for need in sorted(required_deps(folder, src)):
              options = {"pip:" + d for d in need[4:].split("|")} if need.startswith("pip:") \
                  else {need}
              if not options & have:
                problems.append(f"{folder}/BUILD {kind} {name}: {src} imports what "
                                f"{' or '.join(sorted(options))} provides; add it to deps")
    self.assertEmpty(problems, "\n".join(problems))

  def test_the_dependency_check_sees_a_missing_dep(self):
    # st_moe/analysis/tracing.py imports st_moe.tasks (-> tasks/) and mesh_tensorflow.
    needed = required_deps("st_moe", "analysis/tracing.py")
    self.assertIn("tasks:tasks", needed)
    self.assertIn("pip:mesh-tensorflow", needed)
    self.assertNotIn("pip:os", needed)


if __name__ == "__main__":
  absltest.main()
