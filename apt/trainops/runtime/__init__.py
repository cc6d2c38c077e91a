"""The process runtime: the launcher's environment, the process groups and Megatron-core's
parallel state, the seeds. A low service: it imports only torch, Megatron-core and apt.core,
so the model (``APTModel()`` starts a one-process group when none exists), checkpoints and
everything above can use it. The plan, memory estimate and engines in apt.trainops.distributed
sit above the model; ``apt.trainops.distributed`` re-exports ``setup_distributed`` from here.
"""
