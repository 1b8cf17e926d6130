"""The head: multinomial logistic regression on a frozen backbone's features, trained with torch.

``train_head`` fits ``softmax(features @ weight.T + bias)`` with Adam on the mean cross-entropy over shuffled
mini-batches, the L2 penalty (``weight_decay``) on the weights only. The initial weights and every epoch's batch
order come from one ``torch.Generator`` seeded with ``seed``, and the head trains on the CPU (it is a single small
matrix; CPU kernels are deterministic): the same seed and data give bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from aimass.runtime.errors import InvalidArgument
from aimass.training.artifact import BACKBONE_DIMS, IMAGE_TASK, TASK_OF_BACKBONE, TEXT_TASK, HeadArtifact
from aimass.v1 import training_pb2

# training.proto's defaults and ranges for Hyperparameters.
DEFAULT_EPOCHS: Final = {TEXT_TASK: 60, IMAGE_TASK: 40}
DEFAULT_LEARNING_RATE: Final = 0.01
DEFAULT_BATCH_SIZE: Final = 64
DEFAULT_WEIGHT_DECAY: Final = 1e-4
DEFAULT_HOLDOUT_FRACTION: Final = 0.2
DEFAULT_SEED: Final = 0
MAX_EPOCHS: Final = 500
MAX_BATCH_SIZE: Final = 4096
MIN_HOLDOUT_FRACTION: Final = 0.05
MAX_HOLDOUT_FRACTION: Final = 0.5


class TrainingCancelled(Exception):
    """``should_stop()`` said stop: training ended between two batches and produced nothing."""


@dataclass(frozen=True)
class HeadSettings:
    epochs: int
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    seed: int = DEFAULT_SEED

    @classmethod
    def from_hyperparameters(cls, hyperparameters: training_pb2.Hyperparameters) -> HeadSettings:
        """From hyperparameters with the defaults already filled in (``default_settings``)."""
        return cls(
            epochs=hyperparameters.epochs,
            learning_rate=_from_float32(hyperparameters.learning_rate),
            batch_size=hyperparameters.batch_size,
            weight_decay=_from_float32(hyperparameters.weight_decay),
            seed=hyperparameters.seed,
        )


def default_settings(task: str, given: training_pb2.Hyperparameters) -> training_pb2.Hyperparameters:
    """A copy of ``given`` with every unset (zero) field set to its default; InvalidArgument naming the first field
    out of its range (training.proto documents both)."""
    if task not in DEFAULT_EPOCHS:
        raise InvalidArgument(f"unknown task {task!r}; known: {', '.join(DEFAULT_EPOCHS)}")
    result = training_pb2.Hyperparameters()
    result.CopyFrom(given)
    if not result.epochs:
        result.epochs = DEFAULT_EPOCHS[task]
    if not result.learning_rate:
        result.learning_rate = DEFAULT_LEARNING_RATE
    if not result.batch_size:
        result.batch_size = DEFAULT_BATCH_SIZE
    if not result.weight_decay:
        result.weight_decay = DEFAULT_WEIGHT_DECAY
    if not result.holdout_fraction:
        result.holdout_fraction = DEFAULT_HOLDOUT_FRACTION
    _check_range("epochs", result.epochs, 1 <= result.epochs <= MAX_EPOCHS, f"1-{MAX_EPOCHS}")
    lr = result.learning_rate
    _check_range("learning_rate", lr, 0 < lr <= 1, "greater than 0 and at most 1")
    _check_range("batch_size", result.batch_size, 1 <= result.batch_size <= MAX_BATCH_SIZE, f"1-{MAX_BATCH_SIZE}")
    wd = result.weight_decay
    _check_range("weight_decay", wd, 0 <= wd <= 1, "0-1")
    holdout = result.holdout_fraction
    # float32 on the wire: 0.05 arrives as 0.0500000007.
    low, high = np.float32(MIN_HOLDOUT_FRACTION), np.float32(MAX_HOLDOUT_FRACTION)
    allowed = f"{MIN_HOLDOUT_FRACTION}-{MAX_HOLDOUT_FRACTION}"
    _check_range("holdout_fraction", holdout, bool(low <= holdout <= high), allowed)
    return result


def _check_range(field: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        shown = _from_float32(value) if isinstance(value, float) else value
        raise InvalidArgument(
            f"hyperparameters.{field} is {shown}; it must be {allowed} (0 or unset takes the default)",
            metadata={"field": f"hyperparameters.{field}", "allowed": allowed},
        )


def _from_float32(value: float) -> float:
    """A proto float as the decimal a person wrote (0.01, not 0.009999999776482582)."""
    return float(f"{value:.7g}") if math.isfinite(value) else value


def train_head(
    features: npt.NDArray[np.float32],
    labels: Sequence[str],
    settings: HeadSettings,
    *,
    base_model: str,
    task: str,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    info: dict[str, Any] | None = None,
) -> HeadArtifact:
    """A head over ``features`` (N x the backbone's dimensions) for ``labels`` (N), its labels sorted.

    ``on_epoch(epoch, mean_loss)`` after each epoch (1-based); ``should_stop()`` between batches, raising
    TrainingCancelled when it says so. ``info`` goes into the artifact beside the settings and row count."""
    import torch

    dims = BACKBONE_DIMS.get(base_model)
    if dims is None:
        raise InvalidArgument(f"unknown base model {base_model!r}; known: {', '.join(BACKBONE_DIMS)}")
    if TASK_OF_BACKBONE[base_model] != task:
        raise InvalidArgument(f"base model {base_model} is for {TASK_OF_BACKBONE[base_model]}, not {task}")
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != dims:
        raise InvalidArgument(f"features of shape {features.shape} are not N x {dims} features of {base_model}")
    if features.shape[0] != len(labels):
        raise InvalidArgument(f"{features.shape[0]} feature rows but {len(labels)} labels")
    if not np.isfinite(features).all():
        raise InvalidArgument("features hold NaN or infinite values")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidArgument(f"training needs examples of two or more labels, got {len(classes)}")
    _check_settings(settings)

    index = {label: i for i, label in enumerate(classes)}
    x = torch.from_numpy(np.ascontiguousarray(features))
    y = torch.tensor([index[label] for label in labels], dtype=torch.long)
    rows = len(labels)

    generator = torch.Generator(device="cpu")
    generator.manual_seed(settings.seed % (1 << 64))
    # nn.Linear's initialisation (uniform in +-1/sqrt(dims)), drawn from the seeded generator.
    bound = 1.0 / math.sqrt(dims)
    weight = torch.empty(len(classes), dims).uniform_(-bound, bound, generator=generator).requires_grad_()
    bias = torch.empty(len(classes)).uniform_(-bound, bound, generator=generator).requires_grad_()
    optimizer = torch.optim.Adam(
        [{"params": [weight], "weight_decay": settings.weight_decay}, {"params": [bias], "weight_decay": 0.0}],
        lr=settings.learning_rate,
    )

    loss_value = math.nan
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(rows, generator=generator)
        total = 0.0
        for start in range(0, rows, settings.batch_size):
            if should_stop():
                raise TrainingCancelled(f"training stopped in epoch {epoch} of {settings.epochs}")
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(x[batch] @ weight.T + bias, y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        loss_value = total / rows
        if on_epoch is not None:
            on_epoch(epoch, loss_value)

    facts: dict[str, Any] = {
        **asdict(settings),
        "train_rows": rows,
        "final_loss": loss_value,
    }
    return HeadArtifact(
        labels=tuple(classes),
        weight=weight.detach().numpy().astype(np.float32),
        bias=bias.detach().numpy().astype(np.float32),
        base_model=base_model,
        task=task,
        # No timings: the same seed and data give the same bytes.
        info={**facts, **(info or {})},
    )


def _check_settings(settings: HeadSettings) -> None:
    _check_range("epochs", settings.epochs, 1 <= settings.epochs <= MAX_EPOCHS, f"1-{MAX_EPOCHS}")
    lr = settings.learning_rate
    _check_range("learning_rate", lr, 0 < lr <= 1, "greater than 0 and at most 1")
    size = settings.batch_size
    _check_range("batch_size", size, 1 <= size <= MAX_BATCH_SIZE, f"1-{MAX_BATCH_SIZE}")
    wd = settings.weight_decay
    _check_range("weight_decay", wd, 0 <= wd <= 1, "0-1")
