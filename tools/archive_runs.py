r"""Save a reproduction's finished runs without their checkpoints, or restore them to resume a table.

  python tools/archive_runs.py save    --out=reproduction_out --archive=docs/reproduction/small/runs
  python tools/archive_runs.py restore --out=reproduction_out --archive=docs/reproduction/small/runs

`save` copies every finished run of <out>/runs (its bookkeeping JSON, evaluations, routing traces
and training-loss curve; no checkpoint) into the archive; `restore` copies the archived runs into
<out>/runs, never over a run folder that exists; `save` never replaces an archived run with
another training of it (it names it instead). `tools/reproduce.py <table> --out=<out>` then skips
the restored runs and trains the rest: a table too long for one session is finished in the next.
See st_moe/experiments/archive.py for what is kept. gs:// folders work.
"""
from absl import app
from absl import flags

from st_moe.experiments import archive
from st_moe.experiments import jobs

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "reproduction_out", "tools/reproduce.py's output folder.")
flags.DEFINE_string("archive", None, "The archive folder (e.g. docs/reproduction/small/runs).")

ACTIONS = ("save", "restore")


def main(argv):
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f"give one action: {' or '.join(ACTIONS)} (got {argv[1:]})")
  if not FLAGS.archive:
    raise app.UsageError("--archive is required: the folder the runs are saved in or restored "
                         "from, e.g. --archive=docs/reproduction/small/runs")
  out, folder = jobs.abspath(FLAGS.out), jobs.abspath(FLAGS.archive)
  show = lambda line: print(line, flush=True)
  if argv[1] == "save":
    names = archive.save(out, folder, show=show)
    print(f"{len(names)} finished run(s) of {out}/runs archived in {folder}")
  else:
    try:
      names = archive.restore(folder, out, show=show)
    except FileNotFoundError as e:
      raise app.UsageError(str(e)) from e
    print(f"{len(names)} run(s) restored into {out}/runs")


if __name__ == "__main__":
  app.run(main)
