"""``DDPWrapper``: the seed's way to ask for data-parallel training of a model.

``model = DDPWrapper(model); Trainer(model=model, distributed=True)`` trains ``model`` with the
``ddp`` strategy. The wrapper only carries that request: the gradient all-reduce belongs to
the engine the plan picks (DeepSpeed over the data-parallel group, or Megatron's DDP), which
wraps the model itself. Doing the reduction here too would reduce every gradient twice."""
from __future__ import annotations

import torch


class DDPWrapper(torch.nn.Module):
    strategy = "ddp"

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def unwrap_strategy_request(model) -> tuple[torch.nn.Module | None, str | None]:
    """(the model to train, the strategy a wrapper asked for, or None)."""
    if isinstance(model, DDPWrapper):
        return model.module, model.strategy
    return model, None
