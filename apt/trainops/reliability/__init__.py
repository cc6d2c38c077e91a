"""Reliability: what keeps a run alive and honest when the cluster is not.

Preflight checks and ``trainops doctor`` before the start, the orphan guard for the process's
lifetime, the watchdog and the fault injector during steps, the anomaly guard on losses, and the
run control that folds their votes into one decision per step.
"""
