"""Installs st-moe: the `st_moe` library, its SeqIO tasks and its gin files.

The repository keeps `gin/` and `tasks/` at the top level; installed, they live inside the package:
  tasks/  -> the subpackage `st_moe.tasks`  (package_dir mapping)
  gin/    -> data files under `st_moe/gin/` (copied by `build_py`; not a Python package, since the
             top-level name `gin` belongs to gin-config)
`import st_moe` puts that folder on gin's search path, so `--gin_file=st_moe_32b.gin` resolves by name.
"""
import os

import setuptools
from setuptools.command import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))
_GIN_SRC = os.path.join(_HERE, "gin")


class BuildPyWithGin(build_py.build_py):
  """build_py that also copies the top-level gin/ tree into st_moe/gin/."""

  def run(self):
    super().run()
    target_root = os.path.join(self.build_lib, "st_moe", "gin")
    for dirpath, _, filenames in os.walk(_GIN_SRC):
      for name in filenames:
        if not name.endswith(".gin"):
          continue
        src = os.path.join(dirpath, name)
        dst = os.path.join(target_root, os.path.relpath(src, _GIN_SRC))
        self.mkpath(os.path.dirname(dst))
        self.copy_file(src, dst)


setuptools.setup(
    name="st-moe",
    version="0.1.0",
    description="ST-MoE sparse expert models in Mesh TensorFlow",
    python_requires="==3.11.*",
    packages=["st_moe", "st_moe.tasks"],
    package_dir={"st_moe": "st_moe", "st_moe.tasks": "tasks"},
    package_data={"st_moe.tasks": ["data/*"]},
    cmdclass={"build_py": BuildPyWithGin},
    # Dependencies are pinned in requirements.lock and installed from it (see README, "Pins").
    install_requires=[],
)
