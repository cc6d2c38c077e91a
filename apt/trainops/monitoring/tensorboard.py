"""TensorBoard: event files in <run dir>/tensorboard (``tensorboard --logdir runs``)."""
from __future__ import annotations

from .backend import MetricsBackend


class TensorBoardBackend(MetricsBackend):
    name = "tensorboard"

    def open(self, run_dir, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("config_hash", trainer.config.config_hash)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, summary: dict) -> None:
        self.writer.flush()
        self.writer.close()
