"""The evaluation's figures: box plots of the scores, the infection PR curve and threshold sweep,
example slices (CT, expert labels, model labels) from the worst to the best infection Dice, and the
whole-scan trade-off between models (``tradeoff``).

matplotlib is imported lazily with the Agg backend, so the figures render without a display.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from CovidInfectionSegLib.atomic import atomic_path

from .data import INFECTION, LUNG, LUNG_UNKNOWN
from .negatives import apex_indices

BOXPLOT_COLUMNS = ("lung_dice", "lung_nsd", "infection_dice", "infection_nsd")
# The segments' colours in the manifest (Slicer's GenericAnatomyColors), as matplotlib RGB.
LUNG_COLOUR = (128 / 255, 174 / 255, 128 / 255)
INFECTION_COLOUR = (216 / 255, 101 / 255, 79 / 255)
NO_INFECTION_COLOUR = (0.2, 0.4, 1.0)  # "lung, no infection" in the training-label figures
EXAMPLE_QUANTILES = (("worst", 0.0), ("lower quartile", 0.25), ("median", 0.5), ("best", 1.0))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
    _pyplot().close(figure)


def plot_boxplot(panels: list[tuple[str, list[dict[str, Any]]]], path: Path,
                 columns: tuple[str, ...] = BOXPLOT_COLUMNS) -> None:
    """One box plot panel of ``columns`` per ``(title, rows)``; dots when rows are few."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for axis, (title, rows) in zip(axes[0], panels):
        data = [[row[column] for row in rows] for column in columns]
        few = len(rows) <= 50
        axis.boxplot(data, showfliers=not few)
        axis.set_xticks(range(1, len(columns) + 1), [c.replace("_", "\n") for c in columns])
        if few:
            for position, values in enumerate(data, start=1):
                jitter = np.random.default_rng(position).uniform(-0.08, 0.08, len(values))
                axis.scatter(position + jitter, values, s=12, alpha=0.7)
        axis.set_title(f"{title} (n={len(rows)})")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("score")
    _save_figure(figure, path)


def plot_curves(sweep: list[dict[str, float]], pr_rows: list[dict[str, float]], average_precision: float,
                pr_path: Path, sweep_path: Path) -> None:
    """The infection precision-recall curve (with the swept thresholds on it) and the threshold sweep."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([r["recall"] for r in pr_rows], [r["precision"] for r in pr_rows], label=f"AP {average_precision:.3f}")
    axis.scatter([r["recall_pooled"] for r in sweep], [r["precision_pooled"] for r in sweep], s=10, c="C1",
                 label="thresholds 0.05..0.95")
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="infection, pixel level")
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3)
    _save_figure(figure, pr_path)

    figure, axis = plt.subplots(figsize=(6, 4))
    thresholds = [r["threshold"] for r in sweep]
    for key in ("dice_pooled", "dice_case_mean", "precision_pooled", "recall_pooled", "healthy_lung_called_infection"):
        axis.plot(thresholds, [r[key] for r in sweep], marker=".", label=key)
    axis.set(xlabel="infection probability threshold", ylabel="score", ylim=(0, 1))
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    _save_figure(figure, sweep_path)


def example_slices(slice_rows: list[dict[str, Any]], score: str = "infection_dice") -> list[tuple[str, dict[str, Any]]]:
    """The slices at the worst, lower-quartile, median and best ``score``, as ``(name, row)`` pairs."""
    ranked = sorted(slice_rows, key=lambda row: (row[score], row["slice"]))
    return [(name, ranked[round(quantile * (len(ranked) - 1))]) for name, quantile in EXAMPLE_QUANTILES]


def _show_slice(axis, image: np.ndarray, labels: np.ndarray | None, title: str) -> None:
    axis.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    if labels is not None:
        infection = labels == INFECTION
        if infection.any():
            rgba = np.zeros((*labels.shape, 4))
            rgba[infection] = (*INFECTION_COLOUR, 0.55)
            axis.imshow(rgba, interpolation="nearest")
        lung = labels >= LUNG
        if lung.any() and not lung.all():
            axis.contour(lung, levels=[0.5], colors=[LUNG_COLOUR], linewidths=1.0)
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def plot_examples(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                  slice_rows: list[dict[str, Any]], path: Path) -> None:
    """Example validation slices (see :func:`example_slices`), one row each: the CT, the expert labels and
    the model's labels, lung outlined and infection filled in the segments' colours."""
    plt = _pyplot()
    chosen = example_slices(slice_rows)
    figure, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.7 * len(chosen)), squeeze=False)
    for row_axes, (name, row) in zip(axes, chosen):
        index = int(row["slice"])
        _show_slice(row_axes[0], images[index], None, f"{name}: case {row['case']}, validation slice {index}")
        _show_slice(row_axes[1], images[index], truth[index], "expert")
        _show_slice(row_axes[2], images[index], predicted[index],
                    f"model: infection Dice {row['infection_dice']:.2f}, lung {row['lung_dice']:.2f}")
    figure.suptitle("validation slices by infection Dice (lung outlined, infection filled)", fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)


def negative_preview_slices(levels: np.ndarray, labels: np.ndarray) -> list[int | None]:
    """The slices :func:`plot_negative_labels` shows of a scan: the apex (the middle of
    :func:`negatives.apex_indices`, the slices at level 0.8-1 when the lungs' top lies inside the scan), the mid-lung slice with the most "lung, no
    infection" (else the most lung) and the base slice so picked; None where the scan has no such slice."""
    no_infection = (labels == LUNG).sum(axis=(1, 2))
    lung_any = no_infection + (labels == LUNG_UNKNOWN).sum(axis=(1, 2))
    apex = apex_indices(levels)
    picks: list[int | None] = [int(apex[len(apex) // 2]) if len(apex) else None]
    for candidates in (np.flatnonzero((levels >= 0.3) & (levels <= 0.8)), np.flatnonzero((levels >= 0.0) & (levels <= 0.1))):
        if not len(candidates):
            picks.append(None)
            continue
        score = no_infection[candidates] if no_infection[candidates].any() else lung_any[candidates]
        picks.append(int(candidates[np.argmax(score)]))
    return picks


def plot_negative_labels(scans: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], lung_label: str,
                         path: Path) -> None:
    """What the negatives teach, one row per scan: (name, images, labels, levels) as the training
    sampler hands them out. Three slices each (:func:`negative_preview_slices`): apex, mid-lung, base.
    Lung, no infection in blue; "lung or infection" (the loss takes either) in green; background
    uncoloured."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(scans), 3, figsize=(9.6, 3.2 * len(scans)), squeeze=False)
    for row_axes, (name, images, labels, levels) in zip(axes, scans):
        missing = ("no apex: its lungs reach the scan's top", "no mid-lung slice", "no base slice")
        for axis, index, absent in zip(row_axes, negative_preview_slices(levels, labels), missing):
            axis.axis("off")
            if index is None:
                axis.set_title(f"{name}: {absent}", fontsize=7)
                continue
            overlay = np.zeros((*labels[index].shape, 4))
            overlay[labels[index] == LUNG_UNKNOWN] = (*LUNG_COLOUR, 0.35)
            overlay[labels[index] == LUNG] = (*NO_INFECTION_COLOUR, 0.9)
            axis.imshow(images[index], cmap="gray")
            axis.imshow(overlay)
            axis.set_title(f"{name}, slice {index} (level {levels[index]:.2f})", fontsize=7)
    figure.suptitle(f"negatives as trained (lung_label: {lung_label}): blue lung, no infection; "
                    "green lung or infection; apex, mid-lung and base of each scan", fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_painted_slices(rows: list[tuple[int | str, np.ndarray, np.ndarray, np.ndarray]], path: Path, *,
                        what: str, painted_label: int, title: str, fill_labels: bool = True) -> None:
    """Synthetic masses (masses.py), gas pockets (gas_pockets.py) or fainter infection (faint_infection.py) as
    trained, one row per slice: (index, image, painted image, painted labels): the slice as it was, and with
    ``what`` painted into it, outlined in blue where it changed and is labelled ``painted_label``. Without
    ``fill_labels`` the painted slice is shown without its lung outline and infection fill, where a fill
    would hide the change."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 2, figsize=(6.4, 3.2 * len(rows)), squeeze=False)
    for row_axes, (index, image, painted, labels) in zip(axes, rows):
        _show_slice(row_axes[0], image, None, f"slice {index}")
        _show_slice(row_axes[1], painted, labels if fill_labels else None, f"with {what}")
        new = (painted != image) & (labels == painted_label)
        if new.any():
            row_axes[1].contour(new, levels=[0.5], colors=[NO_INFECTION_COLOUR], linewidths=0.8)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.25 / figure.get_figheight()))  # the title above the first row's
    _save_figure(figure, path)


def painted_preview_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every painted-augmentation preview (``python -m covidseg_training.<module> PNG``) takes:
    the PNG to write, how many slices and the seed. ``doc`` is the module's docstring, whose first line
    describes it."""
    parser = argparse.ArgumentParser(prog=f"python -m covidseg_training.{module}", description=doc.split("\n")[0])
    parser.add_argument("out", type=Path, help="the preview PNG")
    parser.add_argument("--count", type=int, default=6, help="slices shown")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def plot_tradeoff(points: list[dict[str, Any]], curve: list[str], curve_name: str, path: Path) -> None:
    """``tradeoff_figure`` saved to ``path``."""
    _save_figure(tradeoff_figure(points, curve, curve_name), path)


def tradeoff_figure(points: list[dict[str, Any]], curve: list[str], curve_name: str):
    """Up to three panels against infection found on the COVID-19 scan (``covid_found``): the mean
    infection on the healthy kernels (``healthy_mean``, target under 30 mL), the mean share of LIDC nodule
    voxels called infection (``nodule_mean``) and the fit to the labelled slices (``fit``); a panel no
    point has a value for is left out. ``points`` hold those keys and a ``label`` each (None where
    unknown), and optionally a ``group`` (points of a group share a colour and a legend entry); the
    labels in ``curve`` are joined by a line. The legend (the line and the groups) is drawn above the
    panels, where it covers none of them, and the points' labels are moved off each other (adjustText)."""
    plt = _pyplot()
    from adjustText import adjust_text
    panels = [(key, ylabel) for key, ylabel in (
        ("healthy_mean", "example-chest-ct infection, mean of kernels L and B (mL)"),
        ("nodule_mean", "LIDC nodule voxels called infection (%), mean of the scans checked"),
        ("fit", "infection Dice on its own labelled slices"),
    ) if any(point.get(key) is not None and point.get("covid_found") is not None for point in points)]
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.4 * max(len(panels), 1), 4.4), squeeze=False)
    figure.subplots_adjust(wspace=0.3)
    groups = list(dict.fromkeys(point["group"] for point in points if point.get("group")))
    group_colours = dict(zip(groups, plt.get_cmap("tab10").colors))
    by_label = {point["label"]: point for point in points}
    for axis, (key, ylabel) in zip(axes[0], panels):
        line = [(by_label[label]["covid_found"], by_label[label][key]) for label in curve]
        line = [(x, y) for x, y in line if x is not None and y is not None]
        if len(line) > 1:
            axis.plot([x for x, _ in line], [y for _, y in line], "-", color="0.6", zorder=1, label=curve_name)
        legend_done: set[str] = set()
        texts = []
        for point in points:
            x, y = point["covid_found"], point[key]
            if x is None or y is None:
                continue
            group = point.get("group")
            colour = group_colours[group] if group else "0.4" if point["label"] in curve else INFECTION_COLOUR
            axis.scatter([x], [y], s=30, zorder=2, color=colour,
                         label=group if group and group not in legend_done else None)
            legend_done.add(group)
            texts.append(axis.text(x, y, point["label"], fontsize=8))
        axis.axvline(200, color="0.8", linestyle="--", zorder=0)
        axis.set_xlabel("covid-chest-ct: infection found (mL; target at least 200)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if key == "healthy_mean":
            axis.axhline(30, color="0.8", linestyle="--", zorder=0)
        # neighbouring epochs sit a few mL apart: their labels are moved apart, each joined to its point
        adjust_text(texts, ax=axis, iter_lim=500,  # a step limit, not its default time limit: the same figure on any machine
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # above the panels: inside one it covered the points in its corner
        figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.98), ncol=min(len(handles), 2),
                      fontsize=8, frameon=False)
    return figure
