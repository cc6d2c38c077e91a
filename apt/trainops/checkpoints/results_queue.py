"""The queue Megatron's shard writers report to, served by a bare interpreter.

Every ``dist_checkpointing.save`` (synchronous or not) writes through Megatron's
``FileSystemWriterAsync``, whose writers put their results into one queue that finalization
reads back (``filesystem_async._get_write_results_queue``). Megatron serves that queue from a
``spawn``-context multiprocessing Manager, and spawn re-imports the caller's main script in the
child: a plain script without an ``if __name__ == "__main__"`` guard (the seed README's
examples) runs again there and dies ("... before the current process has finished its
bootstrapping phase"). A fork-context Manager would not re-import it, but would pin, for as
long as it lives, every page of the trainer's memory that training later changes (offloaded
optimizer state included), and hold the trainer's sockets open.

So: the same kind of Manager queue, served by ``python -I`` running this file. It imports only
the standard library, inherits no file descriptors, shares no memory with the trainer, and exits
when the trainer does (however it ends). ``install()`` puts it where Megatron looks before a
save; Megatron's own spawned manager then never starts. This module must keep importing only
the standard library at top level: the server runs it as a script.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.managers import BaseManager

_PARENT_POLL_S = 0.2


class _QueueManager(BaseManager):
    pass


_QueueManager.register("results")   # the client side: a proxy to the server's queue

_lock = threading.Lock()
_served = None        # (server process, queue proxy) of this process


def install():
    """The queue Megatron's writers report to from now on in this process (started once)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    global _served
    with _lock:
        if _served is None or _served[0].poll() is not None:
            _served = _start()
        filesystem_async._results_queue = _served[1]
        return _served[1]


def _start():
    authkey = os.urandom(32)
    server = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server.stdin.write(authkey.hex() + "\n")   # not on the command line: ps shows that
    server.stdin.close()
    address = server.stdout.readline().strip()
    server.stdout.close()
    if not address:
        raise RuntimeError(f"the checkpoint results queue ({sys.executable} -I {__file__}) "
                           f"did not start: exit code {server.wait()}")
    client = _QueueManager(address=address, authkey=authkey)
    client.connect()
    return server, client.results()


def _serve() -> None:
    """The server process: a queue behind a Manager listener, until the trainer is gone."""
    trainer = os.getppid()
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    results = queue.Queue()

    class Server(BaseManager):
        pass

    Server.register("results", callable=lambda: results)
    server = Server(address=None, authkey=authkey).get_server()   # a Unix socket in a temp dir
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # A writer's result holds torch.distributed.checkpoint objects, which the server unpickles.
    # Import them before anyone can connect: not in the first writer's put (torch's import
    # takes seconds, on the writer's critical path), and never while a handler thread
    # unpickles (torch does not import safely from two threads at once). The trainer starts
    # this server in a background thread at the start of training, so nobody waits for it.
    import torch.distributed.checkpoint.filesystem  # noqa: F401
    try:
        print(server.address, flush=True)
    except BrokenPipeError:   # the trainer ended before its first save (e.g. a refused resume)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    # Reparenting says the trainer died, whether it exited, crashed or was SIGKILLed.
    while os.getppid() == trainer:
        time.sleep(_PARENT_POLL_S)
    sys.exit(0)   # runs multiprocessing's finalizers: the socket and its temp dir are removed


if __name__ == "__main__":
    _serve()
