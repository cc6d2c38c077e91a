"""The seed's import path for the trainers: ``from apt.trainops.engine import Trainer``.

The trainers live in apt/trainops/trainers/; "engine" elsewhere means the DeepSpeed or
Megatron-core engine that runs one step (apt/trainops/distributed/engines/). This package only
keeps the seed API's path working.
"""
from apt.trainops.trainers import *  # noqa: F401,F403
from apt.trainops.trainers import __all__  # noqa: F401
