"""The process exit codes of every APT TrainOps command, in one place.

The lowest layer holds them so that any module (the CLI, the training loop, the watchdog, the
orphan guard) can name a code without importing the module that raises it. Schedulers and
launch scripts branch on them: 2 means fix the input and rerun; 75 means requeue as is.
"""
EXIT_OK = 0
EXIT_CONFIG_ERROR = 2    # bad input: a profile, a file, an argument (one line names it)
EXIT_ANOMALY = 3         # the anomaly guard ended the run (non-finite or spiking loss)
EXIT_HUNG = 4            # the watchdog found a rank stuck in one phase
EXIT_PREEMPTED = 75      # EX_TEMPFAIL: preempted after a committed checkpoint; requeue as is
