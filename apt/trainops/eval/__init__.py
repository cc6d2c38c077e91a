"""Evaluation (Evaluator, compute_metrics, multiple-choice tasks) and throughput/MFU."""
from .evaluator import Evaluator
from .flops import device_peak_flops, mfu, training_flops_per_token
from apt.trainops.objectives.token_metrics import compute_metrics, metrics_from_totals
from .tasks import MultipleChoiceTask

__all__ = ["Evaluator", "MultipleChoiceTask", "compute_metrics", "device_peak_flops",
           "metrics_from_totals", "mfu", "training_flops_per_token"]
