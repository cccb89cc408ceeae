"""A member's training curve beside the models: the loss at every step and, where the data has a validation set, its
mean label accuracy when scored, as CSV and as a chart (training/<member>.csv and .png)."""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no display, no global state

from model_build.train import Trained


def write_curve(directory: Path, member: str, trained: Trained) -> Path:
    """Writes the curve's CSV and PNG into `directory`; the PNG's path."""
    validation = dict(trained.validation)
    with (directory / f"{member}.csv").open("w", newline="") as rows:
        writer = csv.writer(rows)
        writer.writerow(["step", "loss", "validation_mean_label_accuracy"])
        for step, loss in enumerate(trained.losses):
            writer.writerow([step + 1, f"{loss:.6f}", f"{validation[step]:.6f}" if step in validation else ""])
    figure = Figure(figsize=(7, 4))
    loss_axis = figure.subplots()
    loss_axis.plot(range(1, len(trained.losses) + 1), trained.losses, color="tab:blue", linewidth=0.8)
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title=member)
    if validation:
        accuracy_axis = loss_axis.twinx()
        steps = [step + 1 for step in validation]
        accuracy_axis.plot(steps, list(validation.values()), "o-", color="tab:orange")
        accuracy_axis.set_ylabel("validation mean label accuracy")
        if trained.kept_step is not None:
            accuracy_axis.axvline(trained.kept_step + 1, color="tab:orange", linestyle=":", label="kept")
            accuracy_axis.legend(loc="lower right")
    figure.tight_layout()
    path = directory / f"{member}.png"
    figure.savefig(path, dpi=100)
    return path
