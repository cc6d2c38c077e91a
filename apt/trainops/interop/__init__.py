"""Weights from elsewhere into an APT model, and APT's weights for others: a layer above both the
model definition (apt/model) and checkpoint I/O (apt/trainops/checkpoints)."""
