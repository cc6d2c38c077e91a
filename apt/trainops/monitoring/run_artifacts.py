"""RunArtifacts: what a run keeps besides weights and metrics (main rank only).

At the start: environment.json and the tokenizer; after each evaluation: results/eval-stepN.json;
at the end: plots/{loss,lr,throughput}.png from the run's records.
"""
from __future__ import annotations

from apt.trainops.artifacts.environment import collect_environment
from apt.trainops.callbacks import Callback


class RunArtifacts(Callback):
    def __init__(self, plots: bool = True):
        self.plots = plots

    def on_train_start(self, trainer) -> None:
        if trainer.runtime.is_main:
            trainer.artifacts.save_environment(collect_environment(
                trainer.runtime.world_size, trainer.runtime.env.launcher))
            trainer.artifacts.save_tokenizer(trainer.tokenizer)

    def on_evaluate(self, trainer, result: dict) -> None:
        if trainer.runtime.is_main:
            trainer.artifacts.save_result(f"eval-step{result['step']:06d}", result)

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.plots and trainer.runtime.is_main:
            # From metrics.jsonl: the whole run, the steps before a resume included.
            paths = trainer.artifacts.save_plots(title=trainer.config.name)
            summary["plots"] = [str(p) for p in paths]
