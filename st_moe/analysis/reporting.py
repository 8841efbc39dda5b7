"""Reading training summaries and writing reports: markdown tables, loss curves and heat maps as PNG.

Shared by the demo, the routing tracer and the table reproduction tool. Matplotlib runs headless
(Agg backend); TensorFlow is imported only to read event files.
"""
import glob
import math
import os

import numpy as np


def markdown_table(headers, rows, float_format="{:.4g}"):
  """A GitHub markdown table; floats are formatted with `float_format`, None as an empty cell."""

  def cell(v):
    if v is None:
      return ""
    if isinstance(v, float):
      return "nan" if math.isnan(v) else float_format.format(v)
    return str(v).replace("|", "\\|").replace("\n", " ")

  lines = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  for row in rows:
    if len(row) != len(headers):
      raise ValueError(f"markdown_table: a row has {len(row)} cells for {len(headers)} headers: {row}")
    lines.append("| " + " | ".join(cell(v) for v in row) + " |")
  return "\n".join(lines) + "\n"


def read_scalars(log_dir, tags=None):
  """Scalar summaries from every events file directly in `log_dir`.

  Reads both TF1 `simple_value` summaries (the Estimator's loss) and TF2 tensor summaries (mtf's
  host call writes those).

  Returns:
    {tag: (steps <int64>[n], values <float64>[n])}, sorted by step; for a step logged twice (a
    resumed run), the last value wins.
  """
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.framework import tensor_util  # pylint: disable=g-import-not-at-top
  del event_pb2
  found = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    try:
      for event in tf.train.summary_iterator(path):
        for value in event.summary.value:
          if tags is not None and value.tag not in tags:
            continue
          if value.HasField("simple_value"):
            v = value.simple_value
          elif value.HasField("tensor"):
            arr = tensor_util.MakeNdarray(value.tensor)
            if arr.size != 1 or arr.dtype.kind not in "fiu":
              continue
            v = float(arr.reshape(()))
          else:
            continue
          found.setdefault(value.tag, {})[int(event.step)] = float(v)
    except tf.errors.DataLossError:
      continue  # a file still being written: what was read so far counts.
  result = {}
  for tag, by_step in found.items():
    steps = np.array(sorted(by_step), dtype=np.int64)
    result[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
  return result


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(curves, path, title, ylabel="loss", xlabel="step", logy=False):
  """Line plot of several curves, saved as PNG.

  Args:
    curves: {label: (steps, values)}; values may contain NaN (drawn as gaps).
    path: output file (.png); its folder is created.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  for label, (steps, values) in curves.items():
    ax.plot(np.asarray(steps), np.asarray(values, dtype=np.float64), label=label, linewidth=1.4)
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_panels(panels, path, title, ylabel="loss", xlabel="step", ylim=None, columns=4,
                stopped=()):
  """One small line plot per panel, sharing axes, saved as PNG.

  Args:
    panels: {panel title: {label: (steps, values)}}.
    path: output file (.png); its folder is created.
    ylim: (bottom, top) for every panel, or None; values beyond are clipped by the axes.
    columns: panels per row.
    stopped: (panel title, label) pairs whose curves end in an "x" (e.g. runs stopped as diverged).
  """
  plt = _pyplot()
  rows = max(1, -(-len(panels) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.4 * rows + 0.6), dpi=110,
                           sharex=True, sharey=True, squeeze=False)
  stopped = set(stopped)
  for ax, (name, curves) in zip(axes.flat, panels.items()):
    for label, (steps, values) in curves.items():
      line, = ax.plot(np.asarray(steps), np.asarray(values, dtype=np.float64), label=label,
                      linewidth=1.2)
      if len(steps) and (name, label) in stopped:
        y = values[-1] if ylim is None else min(max(values[-1], ylim[0]), ylim[1])
        ax.plot([steps[-1]], [y], marker="x", color=line.get_color(), markersize=8)
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if ylim is not None:
      ax.set_ylim(*ylim)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  for ax in axes[:, 0]:
    ax.set_ylabel(ylabel)
  for ax in axes[-1, :]:
    ax.set_xlabel(xlabel)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_heatmap(matrix, row_labels, col_labels, path, title, value_format="{:.2f}", cmap="viridis"):
  """Heat map of a [rows, cols] matrix with each cell annotated, saved as PNG."""
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"plot_heatmap: matrix shape {matrix.shape} does not match "
                     f"{len(row_labels)} row labels x {len(col_labels)} column labels")
  plt = _pyplot()
  height = max(2.5, 0.32 * len(row_labels) + 1.5)
  width = max(4.0, 1.0 * len(col_labels) + 2.0)
  fig, ax = plt.subplots(figsize=(width, height), dpi=110)
  im = ax.imshow(matrix, aspect="auto", cmap=cmap)
  ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=30, ha="right", fontsize=8)
  ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize=8)
  if matrix.size <= 400:
    top = np.nanmax(matrix) if matrix.size else 0
    for i in range(matrix.shape[0]):
      for j in range(matrix.shape[1]):
        ax.text(j, i, value_format.format(matrix[i, j]), ha="center", va="center", fontsize=7,
                color="black" if matrix[i, j] > 0.6 * top else "white")
  fig.colorbar(im, ax=ax)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
