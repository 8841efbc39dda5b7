"""Reading training summaries and writing reports: markdown tables, loss curves and heat maps as PNG.

Shared by the demo, the routing tracer and the table reproduction tool. Matplotlib runs headless
(Agg backend); TensorFlow is imported to read event files and to write files (tf.io.gfile, so
gs:// paths work).

Plots (each returns the path it wrote):
  plot_loss_curves   training loss, raw (faint) and smoothed, with validation points
  plot_entropy_bars  routing entropy / ln E per sparse layer, encoder and decoder in their own panels
  plot_routing_heatmap  each expert's tokens by class, with the base-rate row
  plot_capacity_grid mean (+- std over seeds) per (train, eval) capacity factor, on a colour scale
                     no narrower than the seed noise
  plot_panels, plot_heatmap   general line plots and heat maps
"""
import glob
import io
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
  """Scalar summaries from every events file directly in `log_dir` (local or gs://).

  Reads both TF1 `simple_value` summaries (the Estimator's loss) and TF2 tensor summaries
  (st_moe.summaries and mtf's host call write those). `st_moe.experiments.events.read_scalars`.

  Returns:
    {tag: (steps <int64>[n], values <float64>[n])}, sorted by step; for a step logged twice (a
    resumed run), the last value wins.
  """
  from st_moe.experiments import events  # pylint: disable=g-import-not-at-top
  return events.read_scalars(log_dir, tags)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path):
  """Writes a figure as PNG to `path` (local or gs://), creating its folder; closes the figure."""
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  folder = os.path.dirname(path)
  if folder:
    tf.io.gfile.makedirs(folder)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())
  return path


def format_mean_std(values, value_format="{:.3f}"):
  """"mean +- std" of the values given (None skipped), the mean alone for one value, "" for none.

  The spread of a single seed is unknown, not zero: it is not printed as "+- 0.000".
  """
  values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  if not values:
    return ""
  mean = float(np.mean(values))
  if len(values) == 1:
    return value_format.format(mean)
  return f"{value_format.format(mean)} +- {value_format.format(float(np.std(values, ddof=1)))}"


def smooth(values, window):
  """Trailing moving average over up to `window` points, NaN ignored (NaN where all are NaN)."""
  values = np.asarray(values, dtype=np.float64)
  if window < 1:
    raise ValueError(f"smooth: window={window} must be >= 1")
  finite = np.isfinite(values)
  sums = np.cumsum(np.where(finite, values, 0.0))
  counts = np.cumsum(finite)
  lagged_sums = np.concatenate([np.zeros(window), sums[:-window]])[:len(values)]
  lagged_counts = np.concatenate([np.zeros(window), counts[:-window]])[:len(values)]
  n = counts - lagged_counts
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, (sums - lagged_sums) / np.maximum(n, 1), np.nan)


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
  return _save(fig, path)


def plot_heatmap(matrix, row_labels, col_labels, path, title, value_format="{:.2f}", cmap="viridis",
                 vmin=None, vmax=None, cell_text=None, separator_after_row=None, colorbar_label=None):
  """Heat map of a [rows, cols] matrix with each cell annotated, saved as PNG.

  Args:
    matrix: <float>[R, C]; NaN cells are blank.
    row_labels, col_labels: R and C labels.
    path: output file (.png, local or gs://).
    value_format: annotation of each cell (unless cell_text is given).
    vmin, vmax: the colour scale's limits (default: the data's).
    cell_text: [R][C] strings to print in the cells instead of value_format.
    separator_after_row: draw a white line below this row index (e.g. above a summary row).
    colorbar_label: text next to the colour bar.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"plot_heatmap: matrix shape {matrix.shape} does not match "
                     f"{len(row_labels)} row labels x {len(col_labels)} column labels")
  plt = _pyplot()
  height = max(2.5, 0.32 * len(row_labels) + 1.5)
  # wide enough for the title too (about 0.08 inch per character at font size 10, plus the bar)
  width = max(4.0, 1.0 * len(col_labels) + 2.0, 0.08 * len(title) + 1.5)
  fig, ax = plt.subplots(figsize=(width, height), dpi=110)
  im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
  ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=30, ha="right", fontsize=8)
  ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize=8)
  if matrix.size <= 400:
    for i in range(matrix.shape[0]):
      for j in range(matrix.shape[1]):
        if cell_text is not None:
          text = cell_text[i][j]
        else:
          text = "" if math.isnan(matrix[i, j]) else value_format.format(matrix[i, j])
        red, green, blue, _ = im.cmap(im.norm(matrix[i, j]))
        bright = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # text dark on a light cell
        ax.text(j, i, text, ha="center", va="center", fontsize=7,
                color="black" if bright else "white")
  if separator_after_row is not None:
    ax.axhline(separator_after_row + 0.5, color="white", linewidth=3)
  bar = fig.colorbar(im, ax=ax)
  if colorbar_label:
    bar.set_label(colorbar_label, fontsize=8)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_loss_curves(train, path, title, validation=None, window=None, ylabel="loss",
                     xlabel="step", logy=False):
  """Training curves as a faint raw line and a bold smoothed line, validation losses as points.

  Args:
    train: {label: (steps, values)} training losses (NaN drawn as gaps).
    path: output file (.png, local or gs://).
    title: the figure's title.
    validation: {label: (steps, values)} validation losses, drawn as markers in the colour of the
      training curve of the same label (a label absent from `train` gets its own colour).
    window: points of the trailing moving average (default: a tenth of the longest curve, >= 1).
  """
  plt = _pyplot()
  validation = validation or {}
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  longest = max([len(v) for _, v in train.values()] or [1])
  window = window or max(1, longest // 10)
  colours = {}
  for label, (steps, values) in train.items():
    steps = np.asarray(steps)
    raw, = ax.plot(steps, np.asarray(values, dtype=np.float64), linewidth=0.8, alpha=0.3)
    colours[label] = raw.get_color()
    ax.plot(steps, smooth(values, window), color=colours[label], linewidth=1.8,
            label=f"{label} (train, mean of {window})" if window > 1 else f"{label} (train)")
  for label, (steps, values) in validation.items():
    ax.plot(np.asarray(steps), np.asarray(values, dtype=np.float64), linestyle="none",
            marker="o", markersize=6, markeredgecolor="black", color=colours.get(label),
            label=f"{label} (validation)")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if train or validation:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_gap(windows, gaps, path, title, point=None, ylabel="sparse ahead by (nats)",
             xlabel="step"):
  """A difference between two models over training as bars around a zero line, so that the sign
  and its change read at a glance; optionally one point with an error bar (e.g. the validation
  effect and its seed spread at the last step).

  Args:
    windows: [(first step, last step)] of each bar.
    gaps: a value per window (None: no bar); > 0 drawn in blue, < 0 in orange.
    path: output file (.png, local or gs://).
    title: the figure's title.
    point: optional (step, value, error, label).
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
  for (first, last), gap in zip(windows, gaps):
    if gap is None:
      continue
    ax.bar((first + last) / 2, gap, width=0.9 * (last - first + 1),
           color="tab:blue" if gap > 0 else "tab:orange", alpha=0.8)
  ax.axhline(0.0, color="black", linewidth=0.8)
  if point is not None:
    step, value, error, label = point
    ax.errorbar([step], [value], yerr=None if error is None else [error], fmt="o",
                color="black", capsize=4, label=label)
    ax.legend(fontsize=8, loc="best")
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return _save(fig, path)


STACKS = ("encoder", "decoder")


def plot_entropy_bars(series, path, title, errors=None, ylabel="router entropy / ln E"):
  """Bars of routing entropy over its bound ln E per sparse layer; one panel per stack.

  Args:
    series: {label: {"encoder": [v per sparse layer], "decoder": [...]}}, v = entropy / ln E in
      [0, 1]; a stack may be missing or shorter in some series (e.g. the paper's six layers).
    path: output file (.png, local or gs://).
    title: the figure's title.
    errors: {label: {stack: [std per layer]}} drawn as error bars (e.g. over seeds), optional.
  """
  plt = _pyplot()
  errors = errors or {}
  stacks = [s for s in STACKS if any(series[l].get(s) for l in series)]
  if not stacks:
    raise ValueError(f"plot_entropy_bars: no encoder or decoder values in {sorted(series)}")
  fig, axes = plt.subplots(1, len(stacks), figsize=(4.0 * len(stacks) + 1.0, 3.6), dpi=110,
                           sharey=True, squeeze=False)
  width = 0.8 / max(1, len(series))
  for ax, stack in zip(axes[0], stacks):
    layers = max(len(series[l].get(stack) or []) for l in series)
    for i, label in enumerate(series):
      values = np.asarray(series[label].get(stack) or [], dtype=np.float64)
      std = errors.get(label, {}).get(stack)
      x = np.arange(1, len(values) + 1) + (i - (len(series) - 1) / 2) * width
      bars = ax.bar(x, values, width=width, label=label,
                    yerr=None if std is None else np.asarray(std, dtype=np.float64), capsize=2)
      if len(values) * len(series) <= 24:
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center", color="white")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="uniform (ln E)")
    ax.set_xticks(range(1, layers + 1))
    ax.set_xlabel(f"{stack} sparse layer")
    ax.set_title(stack, fontsize=10)
    ax.set_ylim(0.0, 1.12)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel(ylabel)
  handles, labels = axes[0][-1].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="upper right", ncol=len(labels))
  fig.suptitle(title, fontsize=10, x=0.02, ha="left")
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  return _save(fig, path)


def plot_bar_panels(panels, path, title):
  """Grouped bars, one panel per source, each with its own value axis: e.g. our scores beside the
  paper's, which sit on other scales (accuracy 0-100 against SuperGLUE 84-87).

  Args:
    panels: {panel title: (ylabel, {series: {category: value or None}})}, left to right; the
      categories (x) are the union over a panel's series in first-seen order; None draws no bar.
      A panel whose values span less than a fifth of their top zooms its axis to them (said in
      its y label) so that differences of a point show.
    path: output file (.png, local or gs://).
    title: the figure's title.
  """
  plt = _pyplot()
  if not panels or not any(any(v is not None for d in series.values() for v in d.values())
                           for _, series in panels.values()):
    raise ValueError(f"plot_bar_panels: no values in the panels {sorted(panels)}")
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), dpi=110,
                           squeeze=False)
  for ax, (panel, (ylabel, series)) in zip(axes[0], panels.items()):
    categories = list(dict.fromkeys(c for d in series.values() for c in d))
    width = 0.8 / max(1, len(series))
    values_all = [v for d in series.values() for v in d.values() if v is not None]
    low, high = (min(values_all), max(values_all)) if values_all else (0.0, 1.0)
    zoom = high > 0 and (high - low) < 0.2 * high
    for i, (name, by_category) in enumerate(series.items()):
      x = np.arange(len(categories)) + (i - (len(series) - 1) / 2) * width
      heights = [by_category.get(c) for c in categories]
      keep = [j for j, h in enumerate(heights) if h is not None]
      bars = ax.bar(x[keep], [heights[j] for j in keep], width=width, label=name)
      ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    if zoom:
      pad = max(0.5, 0.15 * (high - low))
      ax.set_ylim(low - pad, high + pad)
      ylabel += " (axis zoomed)"
    else:
      ax.set_ylim(0.0, high * 1.12 if high > 0 else 1.0)
    ax.set_xticks(np.arange(len(categories)), labels=categories, fontsize=7, rotation=30,
                  ha="right")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(panel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10, x=0.02, ha="left")
  fig.tight_layout(rect=(0, 0, 1, 0.94))
  return _save(fig, path)


def plot_rows(labels, series, path, title, xlabel="value"):
  """One row per label, each series' value as a point with its error bar (e.g. mean +- std over
  seeds): a table's rows side by side when the values are close (NLPs a few hundredths apart).

  Args:
    labels: R row labels, top to bottom.
    series: {name: ([value or None per row], [error or None per row])}; None leaves no point.
    path: output file (.png, local or gs://).
    title: the figure's title.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8.0, max(2.2, 0.38 * len(labels) + 1.2)), dpi=110)
  y = np.arange(len(labels))[::-1]
  offsets = np.linspace(-0.15, 0.15, len(series)) if len(series) > 1 else [0.0]
  for offset, (name, (values, errors)) in zip(offsets, series.items()):
    keep = [i for i, v in enumerate(values) if v is not None]
    if not keep:
      continue
    xs = np.asarray([values[i] for i in keep], dtype=np.float64)
    err = np.asarray([errors[i] or 0.0 for i in keep], dtype=np.float64)
    ax.errorbar(xs, y[keep] + offset, xerr=err, fmt="o", capsize=3, label=name)
    for x, yy in zip(xs, y[keep] + offset):
      ax.annotate(f"{x:.3f}", (x, yy), textcoords="offset points", xytext=(0, 6), fontsize=7,
                  ha="center")
  ax.set_yticks(y, labels=labels, fontsize=8)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.grid(axis="x", alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=7)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_routing_heatmap(shares, base_rates, class_names, path, title):
  """Each expert's first-choice tokens split by class, above the row of all tokens (base rates).

  Args:
    shares: <float>[E, T] rows sum to 1 (an idle expert's row is 0).
    base_rates: <float>[T] the classes' shares of all traced tokens.
    class_names: T column labels.
    path: output file (.png, local or gs://).
    title: the figure's title.
  An expert that specialises stands out against the bottom row: the colour scale is the share,
  0 to 1, the same in every layer's picture.
  """
  shares = np.asarray(shares, dtype=np.float64)
  matrix = np.vstack([shares, np.asarray(base_rates, dtype=np.float64)[None, :]])
  rows = [f"expert {e}" for e in range(shares.shape[0])] + ["all tokens (base rate)"]
  return plot_heatmap(matrix, rows, list(class_names), path, title, value_format="{:.2f}",
                      vmin=0.0, vmax=1.0, separator_after_row=shares.shape[0] - 1,
                      colorbar_label="share of the expert's tokens")


def plot_capacity_grid(values, train_factors, eval_factors, path, title, value_format="{:.3f}",
                       min_span=None, higher_is_better=True, colorbar_label=None):
  """Grid of a metric by (train, eval) capacity factor, cells "mean +- std" over seeds.

  The colour scale spans at least `min_span` (default: 4 x the largest std over seeds, so that
  differences within seed noise look alike; with a single seed, the data's range) around the
  cells' means.

  Args:
    values: [len(train_factors)][len(eval_factors)] lists of per-seed values (None for missing).
    train_factors, eval_factors: the capacity factors of the rows and columns.
    path: output file (.png, local or gs://).
    title: the figure's title.
    value_format: format of mean and std.
    min_span: the narrowest colour range, in the metric's units. With one seed per cell nothing
      measures the noise: pass the spread seen elsewhere (e.g. between seeds of another table).
    higher_is_better: bright is better (False flips the colour map).
    colorbar_label: default "mean over N seeds" (or "one seed: spread unknown").
  """
  means = np.full((len(train_factors), len(eval_factors)), np.nan)
  stds = []
  text = []
  for i, row in enumerate(values):
    text.append([])
    for j, cell in enumerate(row):
      cell = [float(v) for v in (cell or []) if v is not None and not math.isnan(float(v))]
      if cell:
        means[i, j] = float(np.mean(cell))
      if len(cell) > 1:
        stds.append(float(np.std(cell, ddof=1)))
      text[-1].append(format_mean_std(cell, value_format))
  if min_span is None:
    min_span = 4 * max(stds) if stds else 0.0
  if colorbar_label is None:
    seeds = max((len([v for v in c if v is not None]) for r in values for c in r if c), default=0)
    colorbar_label = f"mean over {seeds} seeds" if seeds > 1 else "one seed: spread unknown"
  finite = means[np.isfinite(means)]
  low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  if high - low < min_span:
    middle = (high + low) / 2
    low, high = middle - min_span / 2, middle + min_span / 2
  return plot_heatmap(means, [f"train {c:g}" for c in train_factors],
                      [f"eval {c:g}" for c in eval_factors], path, title,
                      cmap="viridis" if higher_is_better else "viridis_r", vmin=low, vmax=high,
                      cell_text=text, colorbar_label=colorbar_label)
