"""The child side of the code sandbox (``sandbox.py``): run as ``python -I -S sandbox_child.py``.

This file is trusted code that runs first in the fresh child process. It reads its job (the
untrusted program, the tests, the limits) from stdin as JSON, puts the process into its cage,
then executes the program and the tests in this same interpreter, reporting one line per test to
a result file the parent opened for it. Only the standard library is used: the child starts with
``-S``, so site-packages (torch, numpy) cannot be imported by the program either.

Layers, in the order they are applied (each is recorded in the result's ``layers``):
  netns     a new, empty network namespace (no interfaces but a down loopback): root, or an
            unprivileged user namespace where the kernel allows one.
  mountns   a new mount namespace with fresh size-limited tmpfs over /tmp, /var/tmp, /dev/shm and
            over the working directory, so whatever is written there vanishes with the process
            and cannot fill the disk (root only).
  readonly  in that namespace every other mount is remounted read-only: the working directory
            and those private tmpfs are the only places a write can land, whatever the
            permissions of a directory elsewhere (root only).
  rlimits   CPU seconds, address space, file size, processes, open files, no core dumps.
  uid       root drops to a uid of its own for this run (no passwd entry, no groups): the
            process limit then counts only this program's processes, every file it does not own
            is protected by ordinary permissions, and the parent can kill every process of that
            uid afterwards, including ones that left the process group.
  seccomp   a seccomp filter: creating an AF_UNIX socket (what reaches another process's socket
            file; abstract ones are confined by netns) and io_uring (which creates sockets
            without the socket call) fail with EPERM. Root or not (no_new_privs is set first),
            on x86_64 and aarch64; calls of another ABI (x32, 32-bit) fail altogether.
  audit     a Python audit hook that refuses sockets, writes/removals outside the working
            directory, running other programs, signals to other processes, reading other
            processes' /proc entries and ctypes. It is a
            tripwire against accidents and the only layer where no namespace is allowed, not a
            security boundary: the program runs in the same interpreter and can get around it.
"""
import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 1 << 12, 1 << 14, 1 << 18
STDLIB = os.path.dirname(os.__file__)
STDLIB_VIEW = "/tmp/.apt-python-stdlib"
# Exit statuses the parent reads (sandbox.py).
EXIT_OK, EXIT_SETUP, EXIT_MEMORY = 0, 70, 71


def main() -> None:
    job = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    report = job["result_fd"]
    # RLIMIT_NPROC counts the tasks of the real uid in its user namespace. Not root and in the
    # caller's namespace, those are the caller's too: count them now, before a namespace could
    # hide whose they are. (Root is not held to the limit at all: see the uid layer.)
    not_root = os.geteuid() != 0
    already_running = _tasks_of_uid(os.getuid()) if not_root else 0
    layers = []
    try:
        layers += _namespaces(job)
        in_own_user_namespace = not_root and "netns" in layers
        _limits(job, 0 if in_own_user_namespace else already_running)
        layers.append("rlimits")
        if job["uid"] is not None and _drop_privileges(job["uid"], job["dir"]):
            layers.append("uid")
        if job["namespaces"] and _no_unix_sockets():
            layers.append("seccomp")
        if job["audit"]:
            _install_audit_hook(os.path.realpath(job["dir"]))
            layers.append("audit")
    except (OSError, ValueError) as exc:
        os.write(report, f"S {type(exc).__name__}: {exc}".replace("\n", " ").encode() + b"\n")
        os._exit(EXIT_SETUP)
    os.write(report, f"L {' '.join(layers)}\n".encode())
    sys.exit(_run(job["code"], job["tests"], report))


def _namespaces(job) -> list[str]:
    """Network and mount namespaces (see the module doc). A namespace the kernel refuses is
    left out: the parent reads which layers were applied."""
    if not job["namespaces"]:
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    layers = []
    if os.geteuid() == 0:
        if libc.unshare(CLONE_NEWNET) == 0:
            layers.append("netns")
        if libc.unshare(CLONE_NEWNS) == 0 and _private_tmpfs(libc, job):
            layers.append("mountns")
            if _read_only_elsewhere(libc, job):
                layers.append("readonly")
    elif libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        layers.append("netns")
    return layers


def _private_tmpfs(libc, job) -> bool:
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    size = f"size={job['tmpfs_mb']}m"
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(shared):
            libc.mount(b"tmpfs", shared.encode(), b"tmpfs", 0, f"{size},mode=1777".encode())
    _expose_stdlib(libc)
    # The working directory may have been under /tmp: make it again inside the new tmpfs.
    os.makedirs(job["dir"], exist_ok=True)
    owner = f",uid={job['uid']},gid={job['uid']}" if job["uid"] is not None else ""
    ok = libc.mount(b"tmpfs", job["dir"].encode(), b"tmpfs", 0,
                    f"{size},mode=0700{owner}".encode()) == 0
    os.chdir(job["dir"])
    return ok


# Per-mount flags a read-only remount must keep (mountinfo's names): dropping nosuid or noexec
# from a mount would be the opposite of a cage.
_MOUNT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1 << 10, "nodiratime": 1 << 11,
                "relatime": 1 << 21}
MS_RDONLY, MS_REMOUNT = 1, 1 << 5


def _read_only_elsewhere(libc, job) -> bool:
    """Remount every mount of this namespace read-only but the private tmpfs (and the working
    directory on one of them). False if one could not be."""
    keep = {"/tmp", "/var/tmp", "/dev/shm", job["dir"]}
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    ok = True
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")   # mountinfo escapes spaces: \040
        if point in keep:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):
            flags |= _MOUNT_FLAGS.get(option, 0)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            # A mount hidden under one of the new tmpfs is out of reach anyway.
            ok = ok and ctypes.get_errno() in (2, 13) and not os.path.exists(point)
    return ok


def _no_unix_sockets() -> bool:
    """The seccomp filter of the module doc; False where the kernel or the machine has none."""
    import platform
    arch, socket_nr = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}.get(
        platform.machine(), (None, None))
    if arch is None:
        return False
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1   # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    program = [(ld, 0, 0, 4),                 # 0: arch
               (jeq, 0, 7, arch),             # 1: another ABI -> deny
               (ld, 0, 0, 0),                 # 2: syscall number
               (jge, 5, 0, 0x40000000),       # 3: x32 -> deny
               (jeq, 4, 0, 425),              # 4: io_uring_setup -> deny
               (jeq, 0, 2, socket_nr),        # 5: socket? else allow
               (ld, 0, 0, 16),                # 6: its domain (args[0], low word)
               (jeq, 1, 0, 1),                # 7: AF_UNIX -> deny
               (ret, 0, 0, allow),            # 8
               (ret, 0, 0, deny)]             # 9

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]
    filters = (Filter * len(program))(*[Filter(*op) for op in program])
    prog = Program(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:     # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.cast(ctypes.pointer(prog), ctypes.c_void_p), 0, 0) == 0


def _expose_stdlib(libc) -> None:
    """The standard library where the sandbox uid can read it. An interpreter installed under
    a directory only root may enter (pyenv in /root here) would otherwise fail every import
    after the uid drop; a read-only view of it in the private /tmp keeps imports working."""
    if _world_readable(STDLIB):
        return
    os.mkdir(STDLIB_VIEW)
    if libc.mount(STDLIB.encode(), STDLIB_VIEW.encode(), None, MS_BIND | MS_REC, None) == 0:
        moved = lambda paths: [STDLIB_VIEW + p[len(STDLIB):] if p.startswith(STDLIB) else p
                               for p in paths]
        sys.path[:] = moved(sys.path)
        for module in list(sys.modules.values()):  # packages imported at startup (collections)
            if isinstance(getattr(module, "__path__", None), list):
                module.__path__[:] = moved(module.__path__)
        sys.path_importer_cache.clear()


def _world_readable(path: str) -> bool:
    parts = os.path.abspath(path).split(os.sep)
    for depth in range(1, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:depth]) or os.sep).st_mode
        if not mode & 0o001 or (depth == len(parts) and not mode & 0o004):
            return False
    return True


def _limits(job, already_running: int) -> None:
    mb = 1 << 20
    cpu = job["cpu_s"]
    # Where the count includes the caller's tasks, allow those plus the sandbox's share (racy:
    # what the caller starts meanwhile comes off the share).
    nproc = job["max_processes"] + already_running
    for name, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                        (resource.RLIMIT_AS, (job["memory_mb"] * mb,) * 2),
                        (resource.RLIMIT_FSIZE, (job["file_size_mb"] * mb,) * 2),
                        (resource.RLIMIT_NOFILE, (job["max_open_files"],) * 2),
                        (resource.RLIMIT_NPROC, (nproc,) * 2),
                        (resource.RLIMIT_CORE, (0, 0))):
        soft, hard = value
        current_hard = resource.getrlimit(name)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(name, (soft, hard))


def _tasks_of_uid(uid: int) -> int:
    """Tasks (threads) of ``uid`` other than this process."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _drop_privileges(uid: int, directory: str) -> bool:
    """False (and still root) where the sandbox uid could not import the standard library, or
    the kernel refuses the uid."""
    if not (_world_readable(STDLIB) or any(p.startswith(STDLIB_VIEW) for p in sys.path)):
        return False
    try:
        if os.stat(directory).st_uid != uid:  # no tmpfs of its own (no mount namespace)
            os.chown(directory, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError:  # e.g. a container whose user namespace maps no such uid: stay, say so
        return False
    return True


def _install_audit_hook(root: str) -> None:
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # event -> index of the path argument(s) a write-like operation touches.
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                   "os.link": (0, 1), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,),
                   "os.mkfifo": (0,), "os.mknod": (0,)}
    refused = {"socket.__new__": "network sockets", "os.system": "running programs",
               "os.exec": "running programs", "os.posix_spawn": "running programs",
               "os.spawn": "running programs", "subprocess.Popen": "running programs",
               "ctypes.dlopen": "ctypes", "ctypes.dlsym": "ctypes", "os.killpg": "signals"}
    own_pid = os.getpid()

    def inside(path) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        path = os.fsdecode(path)
        if path == os.devnull:
            return True
        full = os.path.realpath(path)
        return full == root or full.startswith(root + os.sep)

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {refused[event]} refused ({event})")
        if event == "import" and args[0] in ("ctypes", "_ctypes"):
            raise PermissionError("sandbox: ctypes refused")
        if event == "os.kill" and args[0] not in (0, own_pid, os.getpid()):
            raise PermissionError("sandbox: signals to other processes refused")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: write outside the working directory refused: "
                                      f"{os.fsdecode(path)}")
            if path is not None and not isinstance(path, int) and _other_process(path):
                # Not root, the trainer runs as our uid: its /proc/<pid>/environ holds its secrets.
                raise PermissionError(f"sandbox: other processes' /proc refused: "
                                      f"{os.fsdecode(path)}")
        elif event in path_events:
            for index in path_events[event]:
                if index < len(args) and args[index] is not None and not inside(args[index]):
                    raise PermissionError(f"sandbox: {event} outside the working directory "
                                          f"refused: {os.fsdecode(args[index])}")

    sys.addaudithook(hook)
    # This file imported ctypes for its own setup; the program has to import it afresh (refused).
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith("ctypes.")]:
        del sys.modules[name]


def _other_process(path) -> bool:
    parts = os.path.realpath(os.fsdecode(path)).split(os.sep)
    return (len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit()
            and int(parts[2]) != os.getpid())


def _run(code: str, tests: list[str], report: int) -> int:
    """The program once, then each test in its namespace; one line per test: P, F or M."""
    sys.dont_write_bytecode = True
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    memory = False
    try:
        exec(compile(code, "<completion>", "exec"), namespace)
        status = "ok"
    except MemoryError:
        status, memory = "memory", True
    except SystemExit as exc:  # a script that ends with sys.exit(0) still gets its tests run
        status = "ok" if exc.code in (None, 0) else f"SystemExit: {exc.code}"
    except BaseException as exc:  # noqa: BLE001 - the program's own failure is its score
        status = f"{type(exc).__name__}: {exc}"
    os.write(report, f"C {status}".replace("\n", " ")[:300].encode() + b"\n")
    if status == "ok":
        for test in tests:
            try:
                exec(compile(test, "<test>", "exec"), namespace)
                line = "P"
            except MemoryError:
                line, memory = "M", True
            except BaseException as exc:  # noqa: BLE001
                line = f"F {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            os.write(report, line.encode() + b"\n")
    sys.stdout.flush()
    return EXIT_MEMORY if memory else EXIT_OK


if __name__ == "__main__":
    main()
