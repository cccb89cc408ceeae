"""Trains one member on the CPU, seeded and reproducible: the same config and data give the same weights. With a
validation set, the weights that scored best on it are kept. A checkpoint saved as training goes lets an interrupted
build resume where it stopped (`build --resume`), to the same weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ensemble_contract.manifest import ImageSpec
from model_build.config import MemberConfig, TrainingConfig
from model_build.data import Batch, TrainingData
from model_build.evaluate import score
from model_build.unet import UNet

VALIDATION_BATCH = 64


def _images(batch: Batch, spec: ImageSpec) -> torch.Tensor:
    return torch.from_numpy(spec.normalise(batch.images)).contiguous(memory_format=torch.channels_last)


def _loss(unet: UNet, batch: Batch, spec: ImageSpec, classification_weight: float) -> torch.Tensor:
    class_logits, mask_logits = unet(_images(batch, spec))
    classification = nn.functional.binary_cross_entropy_with_logits(class_logits, torch.from_numpy(batch.presence))
    if batch.masks is None:
        return classification
    segmentation = nn.functional.cross_entropy(mask_logits, torch.from_numpy(batch.masks).long())
    return segmentation + classification_weight * classification


@torch.no_grad()
def mean_label_accuracy(unet: UNet, images: torch.Tensor, truth: Batch) -> float:
    """The score the build reports (model_build.evaluate.score), of the model in training, on the validation set
    (`images`: its normalised pictures)."""
    unet.eval()
    probabilities = torch.cat([torch.sigmoid(unet(chunk)[0]) for chunk in images.split(VALIDATION_BATCH)]).numpy()
    unet.train()
    return score(probabilities, None, truth).mean_label_accuracy


@dataclass(frozen=True)
class Trained:
    """A member's trained weights (a state dict, so that they cross process boundaries) and where the time went."""

    weights: dict[str, torch.Tensor]
    wall_seconds: float
    cpu_seconds: float  # this process's, all of training
    data_cpu_seconds: float  # of which reading or drawing the batches
    losses: list[float] = field(default_factory=list)  # one per step
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, mean label accuracy) when scored
    kept_step: int | None = None  # the step whose weights these are, when a validation set chose them
    resumed_at: int = 0  # the step this run started from (0: the beginning)

    def describe(self) -> str:
        notes = f"; resumed at step {self.resumed_at + 1}" if self.resumed_at else ""
        if self.kept_step is not None:
            best = dict(self.validation)[self.kept_step]
            notes += f"; kept step {self.kept_step + 1}'s weights, validation mean label accuracy {best:.3f}"
        return (
            f"trained in {self.wall_seconds:.1f} s ({self.cpu_seconds:.1f} s CPU, of which "
            f"{self.data_cpu_seconds:.1f} s reading the batches){notes}"
        )


@dataclass(frozen=True)
class Checkpoint:
    """Where a member's training is saved at each validation interval."""

    path: Path
    fingerprint: str  # of the member's configuration: a checkpoint of another one is not resumed

    def save(self, state: dict[str, Any]) -> None:
        partial = self.path.with_name(f"{self.path.name}.partial")
        torch.save({"fingerprint": self.fingerprint, **state}, partial)
        partial.replace(self.path)  # whole or not at all, wherever the build is stopped

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=False)  # the build's own file; the scheduler's state is not tensors
        return state if state.get("fingerprint") == self.fingerprint else None


def train_member(
    member: MemberConfig,
    training: TrainingConfig,
    spec: ImageSpec,
    data: TrainingData,
    progress_position: int = 0,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
) -> Trained:
    """Trains `member` from its seed alone, or, with `resume`, from its checkpoint when there is one."""
    wall, cpu, data_cpu = time.perf_counter(), time.process_time(), 0.0
    torch.manual_seed(member.seed)
    torch.set_num_threads(training.threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN by default: our kernels overwrite what they allocate,
    # so the weights are bit-identical without it, and the fills took 5-10 % of each step.
    torch.utils.deterministic.fill_uninitialized_memory = False
    # Channels-last: oneDNN's convolutions run about 20 % faster on the CPU in that layout.
    unet = UNet(member.width_scale, len(spec.labels)).to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(
        unet.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay, fused=True
    )
    # Warm up, then anneal to zero: converges much further in a fixed budget than a constant rate.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser,
        max_lr=training.learning_rate,
        total_steps=training.steps,
        pct_start=max(training.warmup_fraction, 2 / training.steps),
    )
    held_out = data.validation_set(training.size)
    scored_on = None if held_out is None else (_images(held_out, spec), held_out)  # normalised once
    every = max(1, training.steps // training.validations)
    losses: list[float] = []
    validation: list[tuple[int, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    start = 0
    if resume and checkpoint is not None and (state := checkpoint.load()) is not None:
        unet.load_state_dict(state["unet"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        losses, validation, best, start = state["losses"], state["validation"], state["best"], state["step"] + 1
    unet.train()
    steps = range(start, training.steps)
    bar = tqdm(steps, total=training.steps, initial=start, desc=member.name, position=progress_position, unit="step")
    for step in bar:
        reading = time.process_time()
        batch = data.training_batch(member.seed, step, training.batch_size, training.size)
        data_cpu += time.process_time() - reading
        loss = _loss(unet, batch, spec, training.classification_loss_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        last = step == training.steps - 1
        if scored_on is not None and ((step + 1) % every == 0 or last):
            validation.append((step, mean_label_accuracy(unet, *scored_on)))
            if best is None or validation[-1][1] > best[0]:
                best = (validation[-1][1], step, {k: v.detach().clone() for k, v in unet.state_dict().items()})
        if checkpoint is not None and (step + 1) % every == 0 and not last:
            state = {"unet": unet.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict()}
            checkpoint.save({**state, "step": step, "losses": losses, "validation": validation, "best": best})
        if step % 10 == 0 or last:
            scored = {"val": f"{validation[-1][1]:.3f}"} if validation else {}
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}", **scored)
    bar.close()
    weights, kept = (best[2], best[1]) if best is not None else (unet.state_dict(), None)
    elapsed = time.perf_counter() - wall, time.process_time() - cpu
    return Trained(weights, *elapsed, data_cpu, losses, validation, kept, start)
