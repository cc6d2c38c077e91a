"""What the loop carries from one step to the next: the part of a run a checkpoint saves and
restores besides weights, optimizer state and RNGs (trainers/checkpointing.py)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainState:
    step: int = 0                  # optimizer steps done (the learning rate is a function of it)
    # The data cursor: samples of the global data order drawn so far. step x global batch,
    # except after a rewind, which skips the batches since the checkpoint it went back to.
    consumed_samples: int = 0
    # An evaluation at ``step`` reached training.target: the run ends there, and a run resumed
    # from this step's checkpoint (with the target unchanged) has nothing left to train.
    target_reached: bool = False
    # A trainer variant's per-rank tensors (e.g. GRPO's buffered rollouts): what its
    # ``rank_state()`` gave at a save; after a load, what the checkpoint held for this rank.
    rank_state: dict | None = None

    def advance(self, global_batch: int) -> None:
        """One step done on one global batch."""
        self.step += 1
        self.consumed_samples += global_batch
