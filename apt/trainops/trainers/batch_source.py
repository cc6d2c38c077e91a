"""Batch sources: the iterator the engine draws each step's micro-batches from.

A batch source is what ``Trainer.training_batches()`` returns (the public hook a trainer
variant overrides to feed the one loop differently). It is an iterator of typed batches on the
device, plus three ``take_*`` methods the loop calls once per step, after the engine drew the
step's micro-batches:

- ``take_wait()``: seconds spent waiting for batches since the last call (``data_wait_s``);
- ``take_sample_digest()``: (sum of sample ids, sum of their squares) consumed since the last
  call, a float64 tensor [2] (summed over data-parallel ranks it names the global batch, so a
  resumed run can prove it neither repeats nor skips samples);
- ``take_extras()``: values the source adds to the step's record (``time/<phase>_s`` for time
  it spent producing the batches, e.g. sampling rollouts; the loop then logs the rest of the
  step as ``time/training_s``).

``TimedBatches`` is the plain one: a data loader's batches, typed and moved to the device.
``apt.trainops.rl.rollouts.RolloutSource`` is the other (GRPO's sampled completions); it reads
its prompts through a ``TimedBatches`` of its own.
"""
from __future__ import annotations

import time

import torch


class TimedBatches:
    """``dataloader``'s batches, typed by ``coerce`` (the objective's: a user's dict becomes
    the objective's batch type) and moved to ``device``, with the time spent waiting for them
    and the digest of the samples they hold."""

    def __init__(self, dataloader, coerce, device):
        self._batches, self._wait = iter(dataloader), 0.0
        self._coerce, self._device = coerce, device
        self._ids = torch.zeros(2, dtype=torch.float64)

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = self._coerce(next(self._batches)).to(self._device, non_blocking=True)
        self._wait += time.perf_counter() - start
        ids = batch.sample_id.to(torch.float64)
        self._ids += torch.stack([ids.sum(), (ids * ids).sum()]).cpu()
        return batch

    def take_wait(self) -> float:
        wait, self._wait = self._wait, 0.0
        return wait

    def take_sample_digest(self) -> torch.Tensor:
        digest, self._ids = self._ids, torch.zeros(2, dtype=torch.float64)
        return digest

    def take_extras(self) -> dict:
        return {}
