"""Published runs (published_runs.yaml) as predictions: each row's inputs through the same
model `trainops plan` uses, against the throughput the source published.

Rows are data read from disk: parsed once, every key checked, and refused with one line when
malformed. Each row carries a hash over its inputs, published number and source, so a number
edited without its source (or the reverse) fails ``verify_hashes`` (and the test suite).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from apt.core.config import ConfigError
from .hardware import load_hardware
from .predict import Prediction, predict
from .shape import Layout, ModelShape

RUNS_FILE = Path(__file__).with_name("published_runs.yaml")
ROW_KEYS = {"id", "source", "gpu", "gpus", "gpus_per_node", "model", "layout", "assumed",
            "published", "hash"}
METRICS = ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_megatron", "tflops_narayanan")
UNITS = {"tokens_per_s_per_gpu": "tok/s/GPU", "tflops_per_gpu": "TFLOP/s/GPU",
         "mfu_megatron": "% MFU", "tflops_narayanan": "TFLOP/s/GPU (Eq. 3)"}


def megatron_flops_per_token(s: ModelShape) -> float:
    """Korthikanti et al. 2022's model FLOPs (their MFU): 72 l h^2 (1 + s/6h + V/12lh) per
    token, a GPT block with a 4h MLP and attention counted without the causal half."""
    h, layers = s.hidden, s.layers
    return 72 * layers * h * h * (1 + s.seq / (6 * h) + s.vocab / (12 * layers * h))


def narayanan_flops_per_token(s: ModelShape) -> float:
    """Narayanan et al. 2021's Equation 3 per token: 96 l h^2 (1 + s/6h + V/16lh), the GEMM
    FLOPs of a GPT block with its full activation recomputation (a second forward) counted."""
    h, layers = s.hidden, s.layers
    return 96 * layers * h * h * (1 + s.seq / (6 * h) + s.vocab / (16 * layers * h))


@dataclass(frozen=True)
class Comparison:
    row: dict
    prediction: Prediction
    published: float
    predicted: float
    metric: str

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


def row_hash(row: dict) -> str:
    body = {k: v for k, v in row.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_runs(path: Path = RUNS_FILE) -> list[dict]:
    try:
        rows = yaml.safe_load(path.read_text())["runs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a runs file ({exc})") from None
    for row in rows:
        if not isinstance(row, dict) or set(row) - ROW_KEYS or ROW_KEYS - {"hash"} - set(row):
            raise ConfigError(f"{path}: row {row.get('id') if isinstance(row, dict) else row!r}"
                              f" needs exactly the keys {sorted(ROW_KEYS)}")
    return rows


def verify_hashes(rows: list[dict]) -> list[str]:
    """The ids of rows whose hash does not match their content (empty: all good)."""
    return [r["id"] for r in rows if r.get("hash") != row_hash(r)]


def _build(cls, values: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def compare(row: dict) -> Comparison:
    where = f"{RUNS_FILE.name} row {row['id']}"
    shape = _build(ModelShape, row["model"], where)
    layout = _build(Layout, {"gpus_per_node": row["gpus_per_node"], **row["layout"]}, where)
    if layout.world != row["gpus"]:
        raise ConfigError(f"{where}: TP x PP x CP x DP = {layout.world}, not {row['gpus']} GPUs")
    hw = load_hardware(row["gpu"])
    p = predict(shape, layout, hw)
    metric = next((k for k in METRICS if k in row["published"]), None)
    if metric is None:
        raise ConfigError(f"{where}: published needs one of {METRICS}")
    predicted = {"tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
                 "tflops_per_gpu": p.tokens_per_s_per_gpu * shape.model_flops_per_token() / 1e12,
                 "mfu_megatron": 100 * p.tokens_per_s_per_gpu * megatron_flops_per_token(shape)
                 / hw.peak(layout.dtype),
                 "tflops_narayanan": p.tokens_per_s_per_gpu * narayanan_flops_per_token(shape)
                 / 1e12}[metric]
    return Comparison(row=row, prediction=p, published=float(row["published"][metric]),
                      predicted=predicted, metric=metric)


def table(comparisons: list[Comparison]) -> str:
    lines = ["| run | GPUs | layout | published | predicted | error | source |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        r, unit = c.row, UNITS[c.metric]
        lay = " ".join(f"{k.upper()}{v}" for k, v in r["layout"].items()
                       if k in ("tp", "pp", "vp", "cp", "ep", "dp") and v > 1)
        zero = r["layout"].get("zero", 1)
        lay += f" ZeRO-{zero} mb{r['layout'].get('micro_batch', 1)}"
        digits = 1 if c.metric == "mfu_megatron" else 0
        lines.append(f"| {r['id']} | {r['gpus']} x {r['gpu']} | {lay} | {c.published:,.{digits}f}"
                     f" {unit} | {c.predicted:,.{digits}f} | {c.error:+.1%} | {r['source']} |")
    errs = [abs(c.error) for c in comparisons]
    lines.append(f"\n{len(errs)} runs: median |error| {statistics.median(errs):.1%}, max "
                 f"{max(errs):.1%}, within 20%: {sum(e <= 0.2 for e in errs)}/{len(errs)}")
    return "\n".join(lines)
