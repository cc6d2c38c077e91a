"""Overrides that tests share about shipped profiles."""

# profiles/70b.yaml carries the layout `trainops plan --search` ranks first on 64 H100s
# (TP4 PP4 CP2 SP, recompute none): no world size below 32 runs it, and context parallel needs
# CUDA. These give 70b back `strategy: auto` (with the selective recompute it had), which sizes
# the layout to any world size: what the seed size table's test and the tests of 70b refused
# for host memory on this machine need.
AUTO_LAYOUT_70B = ("training.distributed.strategy=auto",
                   "training.distributed.tensor_parallel=1",
                   "training.distributed.pipeline_parallel=1",
                   "training.distributed.context_parallel=1",
                   "training.distributed.sequence_parallel=false",
                   "training.distributed.recompute=selective")
