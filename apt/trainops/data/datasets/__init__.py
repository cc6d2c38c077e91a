"""What a training step reads: batches.py (the typed ``LMBatch`` / ``PreferenceBatch`` /
``RolloutBatch``), tokens.py (pretraining windows over a token stream), sft.py, preference.py,
prompts.py (chat records), blend.py (weighted mixtures), augment.py (document transforms)."""
