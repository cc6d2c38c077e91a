"""From datasets to batches: sampler.py (the global, resumable, rank-sharded order) and
loader.py (``create_dataloader``)."""
