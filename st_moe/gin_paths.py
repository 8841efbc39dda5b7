"""Where the project's gin files are, and how gin finds them by bare name. No TensorFlow, no gin import.

`t5_mesh_transformer --gin_file=st_moe_32b.gin` must resolve after `pip install`, with or without
`--module_import`, and without gin's screenful of `E ... Path not found` lines. Two pieces:

  * `resolve(name)`: a bare or relative gin file name -> the file in the project's gin folders
    (`gin/`, `gin/models/`, `gin/layouts/`, `gin/runs/`), else in t5's `t5/models/gin` (found without
    importing t5); None otherwise. The project's folders come first, so our `eval.gin` shadows t5's.
  * `register()`: puts a file reader for those names at the front of gin's readers. gin tries its
    readers for every search-path prefix, the empty prefix first; ours claims our and t5's files at
    that first probe, so gin's resource reader never probes (and logs) the misses.

At interpreter start-up, the `st_moe_gin.pth` file that `pip install` puts in site-packages calls
`install_hook()`: it waits for `gin.config` to be imported and then calls `register()`, so nothing is
imported early (start-up cost: this module, well under a millisecond). `pip uninstall` removes the
`.pth` with the package (it is in the wheel's RECORD).
"""
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SUBFOLDERS = ("models", "layouts", "runs")


def gin_dir():
  """The folder holding the project's gin files.

  Installed with `pip install .`, gin/ is copied into the package as `st_moe/gin`; in a source
  checkout (or an editable install) it is the repository's top-level `gin/`.
  """
  installed = os.path.join(_PACKAGE_DIR, "gin")
  if os.path.isdir(installed):
    return installed
  return os.path.join(os.path.dirname(_PACKAGE_DIR), "gin")


def search_paths():
  """gin_dir() and its subfolders models/, layouts/, runs/, in that order."""
  root = gin_dir()
  return [root] + [os.path.join(root, name) for name in _SUBFOLDERS]


def t5_gin_dir():
  """t5's gin folder (t5/models/gin), found without importing t5; None if t5 is absent."""
  import importlib.util  # pylint: disable=g-import-not-at-top  (not at start-up: it costs ms)
  try:
    spec = importlib.util.find_spec("t5")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", "gin")
  return path if os.path.isdir(path) else None


def resolve(name):
  """The file a relative gin name means: ours first, then t5's; None if neither has it."""
  if not name or os.path.isabs(name) or "://" in name:
    return None
  for folder in search_paths() + [t5_gin_dir()]:
    if folder:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return None


def _exists(name):
  return resolve(name) is not None


def _open(name):
  return open(resolve(name))  # pylint: disable=consider-using-with


def register(gin_config=None):
  """Puts the project's reader first among gin's file readers (idempotent); returns gin.config."""
  if gin_config is None:
    from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  readers = gin_config._FILE_READERS  # pylint: disable=protected-access
  if not any(reader is _open for reader, _ in readers):
    readers.insert(0, (_open, _exists))
  return gin_config


class _AfterGinConfig:
  """Runs register() right after `gin.config` executes, then leaves sys.meta_path (a meta path
  finder: only find_spec is needed, so importlib.abc, which costs milliseconds, is not imported)."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "gin.config":
      return None
    import importlib.machinery  # pylint: disable=g-import-not-at-top
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      try:
        register(module)
      except Exception:  # pylint: disable=broad-except  (never break an import of gin)
        pass

    spec.loader.exec_module = exec_and_register
    return spec


def install_hook():
  """Called by st_moe_gin.pth at start-up: register() as soon as gin is imported."""
  if "gin.config" in sys.modules:
    register(sys.modules["gin.config"])
  elif not any(isinstance(f, _AfterGinConfig) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterGinConfig())
