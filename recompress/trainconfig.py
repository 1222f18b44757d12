"""The training / fine-tune budget (torch-free, so the CLI and the method registry can read it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

OPTIMIZERS = ("adam", "adagrad", "rowwise-adagrad", "sgd")
SHARDINGS = ("table-wise", "column-wise")
TORCHREC = ("pip install --no-deps torchrec==1.9.2 fbgemm-gpu-cpu==1.8.0 && "  # torchrec requires the CUDA
            "pip install iopath tensordict pyre-extensions tqdm")              # fbgemm-gpu: the CPU build instead


@dataclass
class TrainConfig:
    """Budget and optimizer. ``steps`` (if set) caps the number of batches across all epochs.

    ``keep_best``: score the validation split before the first step and ``checks_per_epoch`` times per
    epoch, stop once ``patience`` checks in a row did not improve on the best, and end with the weights
    that scored best on the primary metric, so a fine-tune never ends worse than it started.

    ``shard``: under torchrun, shard the plain tables across the ranks with TorchRec (``recompress.sharding``).
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
    shard: str | None = None

    def validate(self, ranks: int | None = None) -> None:
        """Refuse an impossible budget or option; ``ranks``: the number of processes the run will have where it is
        not launched yet (``--nproc``), so that it refuses once, before any process starts; default: this run's."""
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
        if self.shard is not None:
            self._check_shard(ranks)

    def _check_shard(self, ranks: int | None) -> None:
        from importlib.util import find_spec

        from . import distributed
        if self.shard not in SHARDINGS:
            raise UserError(f"unknown table sharding {self.shard!r}", f"choose one of {', '.join(SHARDINGS)}")
        if self.optimizer == "adam":
            raise UserError("--shard-tables trains table rows with FBGEMM's fused CPU kernels, which have no Adam",
                            "use --optimizer rowwise-adagrad (TorchRec's DLRM recipe), adagrad or sgd")
        if (distributed.size() if ranks is None else ranks) <= 1:
            raise UserError("--shard-tables shares the tables out among several processes, and this run has one",
                            "add --nproc N (or start it with torchrun --nproc-per-node N)")
        if find_spec("torchrec") is None or find_spec("fbgemm_gpu") is None:
            raise UserError("--shard-tables needs TorchRec and FBGEMM, which are not installed", TORCHREC)
