"""Rewards for GRPO (apt/trainops/rewards): each reward on crafted completions, weights, failures,
refusals before training, and the code sandbox's containment (a real subprocess each time)."""
import logging
import math
import os
import shutil
import threading
import time

import pytest

from apt.core.config.errors import ConfigError
from apt.trainops.rewards import sandbox
from apt.trainops.rewards import (Code, ExactMatch, Format, Numeric, RewardSet, SandboxLimits,
                                  check_reward_specs, run_python)


# --- user functions (resolved by name as tests.test_rewards:...) -------------------------------
def length_bonus(prompt, completion, record, scale=1.0):
    return scale * len(completion)


def raise_on_odd(prompt, completion, record):
    if record["i"] % 2:
        raise RuntimeError(f"odd record {record['i']}")
    return 1.0


raise_on_odd.fields = ("i",)


def not_finite(prompt, completion, record):
    return [math.nan, "high", True, 0.5][record["i"]]


def two_arguments(prompt, completion):
    return 0.0


# --- built-in rewards ---------------------------------------------------------------------------
@pytest.mark.parametrize("completion, reward", [
    ("3 + 4 = 7, so 7 * 6 = 42\n#### 42", 1.0),       # GSM8K marker
    ("The answer: 42.", 1.0),                          # answer: marker, trailing full stop
    ("We get 40 + 2 = 42", 1.0),                       # last number
    ("Answer = 42.0", 1.0),                            # number normalisation
    ("#### 41", 0.0),
    ("The answer is 42 but #### 43", 0.0),             # the marker wins over the last number
    ("no idea", 0.0),
])
def test_exact_match_default_extraction(completion, reward):
    assert ExactMatch()("q", completion, {"answer": "42"}) == reward


def test_exact_match_textual_answer_without_marker_is_the_stripped_completion():
    # issue 30: "tnalp" for "plant" scored 0 (the last-number rule found no number), silently
    reverse = ExactMatch()
    assert reverse("reverse plant", " tnalp\n", {"answer": "tnalp"}) == 1.0
    assert reverse("reverse plant", "Tnalp.", {"answer": "tnalp"}) == 1.0   # case, full stop
    assert reverse("reverse plant", "plant", {"answer": "tnalp"}) == 0.0
    assert reverse("", "I think\nanswer: tnalp", {"answer": "tnalp"}) == 1.0  # a marker wins
    assert reverse("", "tnalp 2", {"answer": "tnalp"}) == 0.0    # no last-number rule for text
    assert reverse("", "", {"answer": "tnalp"}) == 0.0
    assert reverse("", "it is 42", {"answer": 42}) == 1.0        # numbers keep the last number


def test_exact_match_pattern_case_and_thousands():
    tagged = ExactMatch(pattern=r"<answer>(.*?)</answer>")
    assert tagged("", "think 7 ... <answer> Paris </answer> 9", {"answer": "paris"}) == 1.0
    assert tagged("", "Paris", {"answer": "Paris"}) == 0.0          # no tag: no answer
    assert ExactMatch(case_sensitive=True)("", "answer: paris", {"answer": "Paris"}) == 0.0
    assert ExactMatch()("", "#### 1,234", {"answer": 1234}) == 1.0


def test_numeric_tolerance():
    assert Numeric(abs_tol=0.01)("", "x = 3.141", {"answer": "3.14159"}) == 1.0
    assert Numeric()("", "x = 3.141", {"answer": 3.14159}) == 0.0
    assert Numeric(rel_tol=0.1)("", "#### 105", {"answer": 100}) == 1.0
    assert Numeric()("", "#### many", {"answer": 1}) == 0.0
    with pytest.raises(ValueError, match="not a number"):
        Numeric()("", "#### 1", {"answer": "one"})


def test_format_fullmatch_and_search():
    think = Format(pattern=r"<think>.*</think>\s*<answer>.*</answer>")
    assert think("", "<think>a\nb</think>\n<answer>3</answer>", {}) == 1.0
    assert think("", "<think>a</think><answer>3</answer> extra", {}) == 0.0
    assert Format(pattern=r"\d+", mode="search")("", "is 12 ok", {}) == 1.0


def test_code_reward_fraction_and_all():
    completion = "Here:\n```python\ndef add(a, b):\n    return a + b if a < 10 else 0\n```\n"
    record = {"tests": ["assert add(1, 2) == 3", "assert add(20, 1) == 21"]}
    assert Code(timeout_s=5)("", completion, record) == 0.5
    assert Code(timeout_s=5, mode="all")("", completion, record) == 0.0
    one_test = {"tests": "assert add(2, 2) == 4"}  # one string: one test
    assert Code(timeout_s=5)("", "def add(a, b): return a + b", one_test) == 1.0
    exits = "def add(a, b): return a + b\nimport sys\nsys.exit(0)"
    assert Code(timeout_s=5)("", exits, one_test) == 1.0


# --- the reward set ------------------------------------------------------------------------------
def test_weights_summed_per_reward_and_failures_logged_once(caplog):
    rewards = RewardSet.from_specs([
        {"name": "exact_match", "weight": 2.0},
        {"name": "format", "weight": 0.5, "pattern": r".*####.*"},
        {"name": f"{__name__}:length_bonus", "weight": 1.0, "scale": 0.01},
        {"name": f"{__name__}:raise_on_odd", "weight": 1.0},
    ], "profiles/x.yaml")
    assert rewards.required_fields == {"answer", "i"}  # raise_on_odd declares "i"
    completions = ["#### 5", "5", "#### 6", "x"]
    records = [{"answer": "5", "i": i} for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="apt.rewards"):
        scores = rewards.score(["p"] * 4, completions, records)
    assert scores.per_reward["exact_match"] == [1.0, 1.0, 0.0, 0.0]
    assert scores.per_reward["format"] == [1.0, 0.0, 1.0, 0.0]
    assert scores.per_reward[f"{__name__}:raise_on_odd"] == [1.0, 0.0, 1.0, 0.0]
    assert scores.failures == {"exact_match": 0, "format": 0, f"{__name__}:length_bonus": 0,
                               f"{__name__}:raise_on_odd": 2}
    expected = [2 + 0.5 + 0.06 + 1, 2 + 0 + 0.01 + 0, 0 + 0.5 + 0.06 + 1, 0 + 0 + 0.01 + 0]
    assert scores.total == pytest.approx(expected)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # one line per failing reward per call, not per sample
    assert "raise_on_odd" in lines[0] and "RuntimeError: odd record 1" in lines[0]
    assert "2 of 4" in lines[0]
    assert scores.metrics()["reward_failures/" + f"{__name__}:raise_on_odd"] == 2.0


def test_a_reward_scoring_0_on_every_sample_says_so_once_then_counts(caplog):
    rewards = RewardSet.from_specs([{"name": "exact_match", "pattern": r"<a>(.*)</a>"},
                                    {"name": "format", "pattern": ".*"}])
    records = [{"answer": "tnalp"}] * 3
    with caplog.at_level(logging.WARNING, logger="apt.rewards"):
        for _ in range(12):
            rewards.score(["p"] * 3, ["tnalp"] * 3, records)
        rewards.score(["p"], ["<a>tnalp</a>"], records[:1])   # scored: not counted
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines   # the first round, then the 10th: not one line per step
    assert lines[0].startswith("reward exact_match (ExactMatch) scored 0 on all 3 samples")
    assert "'tnalp'" in lines[0] and "answer='tnalp'" in lines[0]
    assert "in 10 rounds so far" in lines[1]
    assert rewards.all_zero_calls == {"exact_match": 12}


def test_non_finite_or_non_number_reward_is_a_failure():
    rewards = RewardSet.from_specs([{"name": f"{__name__}:not_finite"},
                                    {"name": "format", "pattern": ".*"},
                                    {"name": "format", "pattern": "a"}])
    scores = rewards.score(["p"] * 4, ["a", "b", "a", "b"], [{"i": i} for i in range(4)])
    assert scores.per_reward[f"{__name__}:not_finite"] == [0.0, 0.0, 1.0, 0.5]
    assert scores.failures[f"{__name__}:not_finite"] == 2
    assert scores.per_reward["format#2"] == [1.0, 0.0, 1.0, 0.0]  # a repeated name: own label
    assert all(math.isfinite(t) for t in scores.total)


def test_spec_parsing():
    specs = check_reward_specs(["exact_match", {"name": "numeric", "weight": "1e-2",
                                                "abs_tol": 0.5}], "p.yaml")
    assert [(s.name, s.weight, s.options) for s in specs] == [
        ("exact_match", 1.0, {}), ("numeric", 0.01, {"abs_tol": 0.5})]
    with pytest.raises(ConfigError, match=r"^p.yaml: training.grpo.rewards\[0\].weight: "):
        check_reward_specs([{"name": "numeric", "weight": "heavy"}], "p.yaml")


def test_unresolvable_names_refused_with_one_line():
    specs = [{"name": "exact_match"}, {"name": "mymod:fn"}]
    with pytest.raises(ConfigError) as err:
        RewardSet.from_specs(specs, "profiles/x.yaml")
    assert str(err.value) == ("profiles/x.yaml: training.grpo.rewards[1].name: 'mymod:fn' does "
                              "not resolve (No module named 'mymod')")
    refusals = {
        f"{__name__}:missing": "has no attribute 'missing'",
        f"{__name__}:two_arguments": r"cannot be called as fn\(prompt, completion, record\)",
        "exact": "unknown reward 'exact'; did you mean 'exact_match'?",
    }
    for name, message in refusals.items():
        with pytest.raises(ConfigError, match=message) as err:
            RewardSet.from_specs([{"name": name}], "p.yaml")
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.patern: format has no option "
                                          r"'patern'; did you mean 'pattern'\?"):
        check_reward_specs([{"name": "format", "patern": "x"}], "p.yaml")
    with pytest.raises(ConfigError, match=r"rewards\[0\]: format: pattern '\(' is not a regular"):
        check_reward_specs([{"name": "format", "pattern": "("}], "p.yaml")


def test_missing_record_field_refused():
    rewards = RewardSet.from_specs([{"name": "numeric"}, {"name": "code", "timeout_s": 5}])
    assert rewards.required_fields == {"answer", "tests"}
    records = [{"answer": 1, "tests": []}, {"answer": 2}]
    with pytest.raises(ConfigError) as err:
        rewards.check_records(records, "data/prompts.jsonl")
    assert str(err.value) == ("data/prompts.jsonl: record 2 of 2: no 'tests' field (reward code "
                              "reads it)")
    rewards.check_records(records[:1], "data/prompts.jsonl")


# --- the sandbox --------------------------------------------------------------------------------
def _sandbox_sessions():
    """{session id: {pid: parent pid}} of live (not zombie) sandbox processes on this machine."""
    sessions = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sandbox_child.py" not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                state, ppid, _, session = f.read().rpartition(")")[2].split()[:4]
        except OSError:
            continue
        if state != "Z":
            sessions.setdefault(int(session), {})[int(pid)] = int(ppid)
    return sessions


def _run_watched(code, limits):
    """run_python while a thread samples the sandbox's processes: (result, most processes seen in
    one sandbox session, the sessions seen). Only sessions this process started count (their
    leader is our child), so other sandboxes on a shared machine do not."""
    seen, most, done = set(), [0], threading.Event()

    def watch():
        while not done.is_set():
            for session, pids in _sandbox_sessions().items():
                if session in seen or pids.get(session) == os.getpid():
                    seen.add(session)
                    most[0] = max(most[0], len(pids))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_python(code, ["assert True"], limits)
    finally:
        done.set()
        watcher.join()
    return result, most[0], seen


def test_sandbox_runs_code_and_tests():
    result = run_python("def f(x):\n    return 2 * x\nprint('hello')",
                        ["assert f(2) == 4", "assert f(3) == 7", "assert f(0) == 0"])
    assert (result.passed, result.total, result.reason) == (2, 3, "ok")
    assert result.stdout_tail == "hello\n" and result.fraction == pytest.approx(2 / 3)
    assert {"rlimits", "audit"} <= set(result.layers)


def test_sandbox_that_cannot_start_is_not_the_programs_fault(monkeypatch, tmp_path):
    # A broken install (the child script missing): the code reward must count a failure and
    # say why, never score the program 0 as if it were wrong.
    monkeypatch.setattr(sandbox, "CHILD", str(tmp_path / "missing.py"))
    result = run_python("x = 1", ["assert x == 1"])
    assert result.reason == "setup" and "can't open file" in result.detail, result
    rewards = RewardSet.from_specs([{"name": "code", "timeout_s": 5}])
    scores = rewards.score(["p"], ["x = 1"], [{"tests": ["assert x == 1"]}])
    assert scores.failures == {"code": 1}
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)


@pytest.mark.parametrize("loop", ["while True:\n    pass",                 # the CPU limit or
                                  "import time\nwhile True:\n    time.sleep(1)"],  # the clock
                         ids=["busy", "sleeping"])
def test_sandbox_infinite_loop_times_out_and_leaves_nothing(loop):
    result, most, sessions = _run_watched(loop, SandboxLimits(timeout_s=2))
    assert result.reason == "timeout" and result.passed == 0
    assert result.wall_s < 10
    assert most >= 1  # the watcher saw it running ...
    assert not set(_sandbox_sessions()) & sessions  # ... and it is gone


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_sandbox_fork_bomb_is_held_to_the_process_limit(namespaces):
    if os.geteuid() == 0 and not namespaces:
        pytest.skip("root is held to a process limit only under a uid of its own")
    # Every process forks 7 times (2**7 = 128 processes were nothing to stop it: a bomb that
    # stays harmless on a shared machine should the limit ever fail), then waits to be killed.
    bomb = ("import os, time\n"
            "for _ in range(7):\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n"
            "time.sleep(60)\n")
    limit = 6
    limits = SandboxLimits(timeout_s=4, max_processes=limit, namespaces=namespaces)
    result, most, sessions = _run_watched(bomb, limits)
    assert result.reason == "timeout"
    assert 1 < most <= limit, most  # it did fork, and never beyond the limit
    time.sleep(0.2)
    assert not set(_sandbox_sessions()) & sessions


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own needs root")
def test_sandbox_kills_a_process_that_left_the_group():
    code = ("import os, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.setsid()\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "print('escaped', pid)\n")
    result = run_python(code, [], SandboxLimits(timeout_s=5))
    assert result.reason == "ok" and "uid" in result.layers
    escaped = int(result.stdout_tail.split()[-1])
    time.sleep(0.2)
    assert escaped not in {pid for pids in _sandbox_sessions().values() for pid in pids}


# Each containment holds with every layer, with the operating system's alone (root: namespaces,
# a uid of its own) and with the audit hook alone (what is left where neither is allowed).
LAYERS = {"all-layers": SandboxLimits(), "os-layers-only": SandboxLimits(audit_hook=False),
          "audit-hook-only": SandboxLimits(namespaces=False, own_uid=False)}


@pytest.mark.parametrize("layers", LAYERS)
def test_sandbox_write_outside_the_directory_is_refused(tmp_path, layers):
    if layers == "os-layers-only" and os.geteuid() != 0:
        pytest.skip("without root only the audit hook guards writes")
    target = tmp_path / "escaped.txt"
    code = (f"open('inside.txt', 'w').write('fine')\n"
            f"open({str(target)!r}, 'w').write('escaped')\n")
    result = run_python(code, [], LAYERS[layers])
    assert result.reason == "error"
    assert "PermissionError" in result.detail or "FileNotFoundError" in result.detail, result
    assert not target.exists()


@pytest.mark.parametrize("layers", LAYERS)
def test_sandbox_sees_no_secrets(monkeypatch, layers):
    if layers == "os-layers-only" and os.geteuid() != 0:
        pytest.skip("without root only the audit hook guards the trainer's /proc")
    monkeypatch.setenv("APT_TEST_SECRET", "s3cret-token")
    code = ("import os\n"
            "print(dict(os.environ))\n"
            f"print(open('/proc/{os.getpid()}/environ').read())\n")
    result = run_python(code, [], LAYERS[layers])
    assert "PermissionError" in result.detail, result
    assert "PATH" in result.stdout_tail and "s3cret" not in result.stdout_tail


def test_sandbox_memory_bomb():
    # 1 GiB in 16 MiB steps (bounded, so a missing limit fails the test, not the machine).
    result = run_python("chunks = [bytearray(16 << 20) for _ in range(64)]",
                        ["assert True"], SandboxLimits(memory_mb=128))
    assert result.reason == "memory", result


@pytest.mark.parametrize("layers", LAYERS)
def test_sandbox_network_refused(layers):
    code = ("import socket\n"
            "s = socket.socket()\n"
            "s.settimeout(2)\n"
            "s.connect(('127.0.0.1', 1))\n")  # even loopback: nothing to reach, not even refused
    result = run_python(code, [], LAYERS[layers])
    if layers == "os-layers-only" and os.geteuid() != 0 and "netns" not in result.layers:
        pytest.skip("no user namespaces here: only the audit hook guards the network")
    assert result.reason == "error"
    assert ("Network is unreachable" in result.detail or "sockets refused" in result.detail), result


def test_sandbox_as_root_writes_nowhere_else_and_reaches_no_unix_socket():
    """With the audit hook off (a program can switch it off): a world-writable directory of the
    root file system outside /tmp, and a world-connectable Unix socket in it, stay out of reach
    (read-only mounts, seccomp); what is left without root is in docs/trainers.md."""
    import socket
    import tempfile
    from apt.trainops.rewards.sandbox_child import _world_readable
    if os.geteuid() != 0:
        pytest.skip("the read-only file system needs root (a mount namespace)")
    # A directory of the root file system that the sandbox's private tmpfs (/tmp, /var/tmp,
    # /dev/shm) do not hide: the repository, unless it lies under one of them (a clone in /tmp
    # is simply invisible in there, which proves nothing about the read-only mounts), else /srv.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hidden = ("/tmp", "/var/tmp", "/dev/shm")
    base = "/srv" if any(repo == h or repo.startswith(h + "/") for h in hidden) else repo
    if not os.path.isdir(base) or not _world_readable(base):
        pytest.skip(f"{base} is not reachable by another uid")
    shared = tempfile.mkdtemp(dir=base, prefix=".sandbox-shared-")
    server = socket.socket(socket.AF_UNIX)
    try:
        os.chmod(shared, 0o1777)
        server.bind(os.path.join(shared, "sock"))
        os.chmod(os.path.join(shared, "sock"), 0o777)
        server.listen(4)
        server.setblocking(False)
        limits = SandboxLimits(audit_hook=False)
        wrote = run_python(f"open({shared!r} + '/escaped', 'w').write('x')", [], limits)
        connected = run_python(f"import socket\ns = socket.socket(socket.AF_UNIX)\n"
                               f"s.connect({shared!r} + '/sock')\n", [], limits)
        assert sorted(os.listdir(shared)) == ["sock"]      # nothing written there
        with pytest.raises(BlockingIOError):
            server.accept()                                 # nobody connected
        assert wrote.reason == "error" and "Read-only file system" in wrote.detail, wrote
        assert connected.reason == "error" and "Operation not permitted" in connected.detail, \
            connected
        assert {"readonly", "seccomp"} <= set(wrote.layers), wrote
    finally:
        server.close()
        shutil.rmtree(shared, ignore_errors=True)
