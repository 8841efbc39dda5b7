"""A parent process for tests/runner_test.py: starts one runner.run child and waits in it.

  python tests/runner_parent.py <model_dir>

The child is a real t5_mesh_transformer (asked for many steps); the test kills this process by its
PID and checks that the child is gone too.
"""
import sys

from st_moe.experiments import runner


def main(model_dir):
  runner.run(model_dir, ["dataset.gin", "st_moe_tiny.gin", "cpu.gin"],
             ["utils.run.train_steps = 100000"], tokens_per_step=1, label="killed",
             show=lambda line: None)


if __name__ == "__main__":
  main(sys.argv[1])
