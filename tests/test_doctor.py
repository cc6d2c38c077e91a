"""``python -m apt doctor``: a table and a verdict; exit 0 on a machine that can run the
profile, exit 2 naming each check a run would fail."""
import re
import socket

from apt.cli import main as apt_main


def _rows(out: str) -> dict:
    """The table's rows: name -> (status, detail)."""
    rows = re.findall(r"^  (.+?)\s+(ok|warn|FAIL)  (.*)$", out, flags=re.MULTILINE)
    return {name: (status, detail) for name, status, detail in rows}


def _doctor(capsys, *argv) -> tuple[int, dict, str]:
    code = apt_main(["doctor", "--profile", "tiny", *argv])
    out = capsys.readouterr().out
    return code, _rows(out), out


def test_doctor_ready_then_broken(capsys, monkeypatch, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    good = ["--set", "training.checkpoints.save_interval=100",
            "--set", f"training.checkpoints.dir={tmp_path / 'checkpoints'}"]
    code, rows, out = _doctor(capsys, *good)
    assert code == 0 and "verdict: ready" in out, out
    expected = {"python", "torch", "megatron-core", "deepspeed", "transformer-engine",
                "cpu compat layer", "cuda / nccl", "plan", "memory", "checkpoint dir",
                "/dev/shm", "master port", "torch extensions"}
    assert set(rows) == expected, out
    assert rows["master port"][0] == "ok" and rows["checkpoint dir"][0] == "ok", out

    # Broken: the master port taken, the extensions directory and checkpoint dir unwritable.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/sys/apt-extensions")
        code, rows, out = _doctor(capsys, "--set", "training.checkpoints.save_interval=100",
                                  "--set", "training.checkpoints.dir=/sys/apt-checkpoints")
    assert code == 2, out
    failed = {name for name, (status, _) in rows.items() if status == "FAIL"}
    assert failed == {"master port", "torch extensions", "checkpoint dir"}, out
    assert f"127.0.0.1:{port}" in rows["master port"][1] and "in use" in rows["master port"][1]
    assert "/sys/apt-checkpoints" in rows["checkpoint dir"][1]
    assert ("verdict: NOT READY, a run would fail: checkpoint dir, master port, "
            "torch extensions") in out, out
