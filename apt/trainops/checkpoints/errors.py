"""The one error type of checkpoint loading and saving (launch/train.py and the CLI print it as
one line and exit with code 2)."""


class CheckpointError(RuntimeError):
    pass
