"""Installs st-moe: the `st_moe` library, its SeqIO tasks and its gin files.

The repository keeps `gin/` and `tasks/` at the top level; installed, they live inside the package:
  tasks/  -> the subpackage `st_moe.tasks`  (package_dir mapping)
  gin/    -> data files under `st_moe/gin/` (copied by `build_py`; not a Python package, since the
             top-level name `gin` belongs to gin-config)
  st_moe_gin.pth -> site-packages (written by build_py, in the wheel's RECORD, so `pip uninstall`
             removes it): at interpreter start it calls st_moe.gin_paths.install_hook(), which
             waits for gin to be imported and then lets gin resolve `--gin_file=st_moe_32b.gin` by
             bare name, with no --module_import (no TensorFlow or gin import at start-up).
"""
import os

import setuptools
from setuptools.command import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))
_GIN_SRC = os.path.join(_HERE, "gin")
PTH_NAME = "st_moe_gin.pth"
# A .pth line starting with "import" is executed by site.py at start-up; it must never fail.
PTH_LINE = ("import sys; exec('try:\\n import st_moe.gin_paths as m\\n m.install_hook()\\n"
            "except Exception:\\n pass')\n")


class BuildPyWithGin(build_py.build_py):
  """build_py that also copies the top-level gin/ tree into st_moe/gin/."""

  def run(self):
    super().run()
    self._write_pth()
    target_root = os.path.join(self.build_lib, "st_moe", "gin")
    for dirpath, _, filenames in os.walk(_GIN_SRC):
      for name in filenames:
        if not name.endswith(".gin"):
          continue
        src = os.path.join(dirpath, name)
        dst = os.path.join(target_root, os.path.relpath(src, _GIN_SRC))
        self.mkpath(os.path.dirname(dst))
        self.copy_file(src, dst)

  def _write_pth(self):
    """st_moe_gin.pth at the root of what is installed into site-packages.

    A wheel installs build_lib's root into site-packages. An editable install (PEP 660) builds a
    wheel from setuptools' install_lib folder instead and ignores build_lib, so there the file goes
    to install_lib.
    """
    roots = [self.build_lib]
    if getattr(self, "editable_mode", False):
      roots = [self.get_finalized_command("install").install_lib]
    for root in roots:
      self.mkpath(root)
      with open(os.path.join(root, PTH_NAME), "w") as f:
        f.write(PTH_LINE)


setuptools.setup(
    name="st-moe",
    version="0.1.0",
    description="ST-MoE sparse expert models in Mesh TensorFlow",
    python_requires="==3.11.*",
    packages=["st_moe", "st_moe.analysis", "st_moe.experiments", "st_moe.tasks"],
    package_dir={"st_moe": "st_moe", "st_moe.tasks": "tasks"},
    package_data={"st_moe.tasks": ["data/*"]},
    cmdclass={"build_py": BuildPyWithGin},
    # Dependencies are pinned in requirements.lock and installed from it (see README, "Pins").
    install_requires=[],
)
