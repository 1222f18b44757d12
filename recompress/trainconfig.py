"""The training / fine-tune budget (torch-free, so the CLI and the method registry can read it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

OPTIMIZERS = ("adam", "adagrad", "rowwise-adagrad", "sgd")


@dataclass
class TrainConfig:
    """Budget and optimizer. ``steps`` (if set) caps the number of batches across all epochs.

    ``keep_best``: score the validation split before the first step and ``checks_per_epoch`` times per
    epoch, stop once ``patience`` checks in a row did not improve on the best, and end with the weights
    that scored best on the primary metric, so a fine-tune never ends worse than it started.
    """

    epochs: int = 1
    steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 256
    optimizer: str = "adam"
    seed: int = 0
    keep_best: bool = False
    checks_per_epoch: int = 4
    patience: int = 2

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}", f"choose one of {', '.join(OPTIMIZERS)}")
        for name, value, ok in (("--epochs", self.epochs, self.epochs >= 1), ("--batch-size", self.batch_size,
                                self.batch_size >= 1), ("--lr", self.lr, self.lr > 0),
                                ("--steps", self.steps, self.steps is None or self.steps >= 0),
                                ("checks_per_epoch", self.checks_per_epoch, self.checks_per_epoch >= 1),
                                ("patience", self.patience, self.patience >= 1)):
            if not ok:
                raise UserError(f"{name} {value} is impossible",
                                "epochs and batch size must be >= 1, lr > 0 and steps >= 0")
