"""ArtifactManager: one directory per run, a stable layout, only the main rank writes.

    <output_dir>/<experiment>-<YYYYmmdd-HHMMSS>/
        config.yaml      resolved profile (every key), with its hash
        plan.txt         the parallel plan as `trainops plan` prints it
        metrics.jsonl    one JSON object per logged step / evaluation / checkpoint / resume
        logs.txt         human-readable log lines
        model/           final weights (model.pt: tensors only, loads with weights_only=True)
        tokenizer/       the tokenizer as tokenizer.save() writes it (load_tokenizer() reads it)
        environment.json package versions, Python, CPU/RAM or GPUs, world size, git commit
        results/         intermediate results (eval-step000100.json per evaluation)
        plots/           loss.png, lr.png, throughput.png (+ reward.png for RL)
        sample.txt       generated text at the end of training
        summary.json     final numbers of the run
        tensorboard/ wandb/ mlflow.db   monitoring backends, when enabled
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml


def _unused(path: Path) -> Path:
    """Two runs started within the same second (a quick restart) get separate directories."""
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate



def config_yaml(config_dict: dict, config_hash: str) -> str:
    """A resolved config as written into run directories (from_pretrained reads it back)."""
    return f"# config hash {config_hash}\n" + yaml.safe_dump(config_dict, sort_keys=False)

class ArtifactManager:
    def __init__(self, output_dir: str | os.PathLike = "outputs", experiment_name: str = "run",
                 *, run_dir: str | os.PathLike | None = None, enabled: bool = True):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir) if run_dir else _unused(Path(output_dir) /
                                                              f"{experiment_name}-{stamp}")
        self.enabled = enabled
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def save_config(self, config_dict: dict, config_hash: str) -> None:
        self._write("config.yaml", config_yaml(config_dict, config_hash))

    def save_text(self, name: str, text: str) -> None:
        self._write(name, text if text.endswith("\n") else text + "\n")

    def save_metrics(self, metrics: dict) -> None:
        """Append one record to metrics.jsonl (a dict of numbers, with its step)."""
        if self.enabled:
            with open(self.path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics, sort_keys=True) + "\n")

    def save_logs(self, logs: str | list[str]) -> None:
        lines = [logs] if isinstance(logs, str) else logs
        if self.enabled:
            with open(self.path("logs.txt"), "a") as f:
                f.writelines(line.rstrip("\n") + "\n" for line in lines)

    def save_summary(self, summary: dict) -> None:
        self._write("summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def save_model(self, model_or_state: torch.nn.Module | dict, name: str = "model") -> Path:
        """Tensors only, so ``torch.load(..., weights_only=True)`` reads it (no pickled code)."""
        state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) \
            else model_or_state
        tensors = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
        target = self.path(name) / "model.pt"
        if self.enabled:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            torch.save(tensors, tmp)
            os.replace(tmp, target)  # never leave a half-written model.pt behind
        return target

    def save_environment(self, info: dict) -> None:
        self._write("environment.json", json.dumps(info, indent=2, sort_keys=True) + "\n")

    def save_tokenizer(self, tokenizer) -> Path | None:
        """tokenizer/: whatever ``tokenizer.save`` writes; ``load_tokenizer`` reads it back."""
        if tokenizer is None or not self.enabled:
            return None
        return tokenizer.save(self.path("tokenizer"))

    def save_result(self, name: str, result: dict) -> None:
        """An intermediate result, results/<name>.json."""
        if self.enabled:
            self.path("results").mkdir(exist_ok=True)
        self._write(f"results/{name}.json", json.dumps(result, indent=2, sort_keys=True) + "\n")

    def save_plots(self, records: list[dict] | None = None, title: str = "") -> list[Path]:
        """plots/{loss,lr,throughput}.png (and reward.png for RL) from ``records`` (default:
        metrics.jsonl)."""
        if not self.enabled:
            return []
        from .plots import plot_metrics
        return plot_metrics(records if records is not None else self.read_metrics(),
                            self.path("plots"), title)

    def read_metrics(self) -> list[dict]:
        if not self.path("metrics.jsonl").is_file():
            return []
        with open(self.path("metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    def supersede_metrics(self, step: int) -> int:
        """A run resumed at ``step`` re-runs the steps after it: drop the records of those
        steps (and of evaluations, checkpoints and resumes after it) from metrics.jsonl, so
        it holds one history, the one that continues. A line cut short by a crash goes too.
        Returns how many records were dropped."""
        path = self.path("metrics.jsonl")
        if not self.enabled or not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            at = record.get("step", record.get("checkpoint_step"))
            if at is not None and at > step:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            tmp = self.path("metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        return dropped

    def _write(self, name: str, text: str) -> None:
        if self.enabled:
            tmp = self.path(name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path(name))
