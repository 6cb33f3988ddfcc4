"""Rotating log files (size-bounded, private, never the reason a process stops) and
`appliance logs`, which reads and follows them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.logs import RotatingFile, SharedRotatingFile, popen_logged
from tests.test_cli import Cli


def _wait_for(path: Path, text: bytes, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if text in data:
            return data
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never reached {path}")


def test_files_rotate_by_size_and_keep_a_bounded_number(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "logs" / "x.log", max_bytes=100, backups=2)
    for i in range(20):
        log.write(f"line {i:02d} {'.' * 30}\n".encode())  # 40 bytes a line
    log.close()
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["x.log", "x.log.1", "x.log.2"]
    assert all((tmp_path / "logs" / n).stat().st_size <= 100 for n in names)
    assert b"line 19" in (tmp_path / "logs" / "x.log").read_bytes()
    assert b"line 00" not in b"".join((tmp_path / "logs" / n).read_bytes() for n in names)


def test_log_files_are_private(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "logs" / "x.log")
    log.write(b"hello\n")
    log.close()
    assert stat.S_IMODE((tmp_path / "logs" / "x.log").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o750


def test_a_failed_write_loses_lines_not_the_process(tmp_path: Path) -> None:
    target = tmp_path / "logs" / "x.log"
    log = RotatingFile(target)
    log.write(b"before\n")
    log.close()
    # The file cannot be opened any more (as on a full or read-only disk).
    target.unlink()
    target.mkdir()
    log.write(b"lost line\n")  # must not raise
    assert log.lost == len(b"lost line\n")
    target.rmdir()
    log.write(b"after\n")
    log.close()
    text = target.read_bytes()
    assert b"10 bytes of log were lost" in text and text.endswith(b"after\n")


def test_a_child_process_output_goes_to_its_rotating_log(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    proc = popen_logged(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
        path,
        header=b"$ child\n",
    )
    assert proc.wait(timeout=30) == 0
    data = _wait_for(path, b"err")
    assert data.startswith(b"$ child\n") and b"out\n" in data


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_drops_lines_and_recovers(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        log = RotatingFile(mount / "x.log", max_bytes=10**9)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        for _ in range(100):
            log.write(b"x" * 1000 + b"\n")  # nothing fits; nothing raises
        assert log.lost > 0
        filler.unlink()
        log.write(b"back\n")
        log.close()
        assert (mount / "x.log").read_bytes().endswith(b"back\n")
        assert b"bytes of log were lost" in (mount / "x.log").read_bytes()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _append_lines(path: str, writer: int, count: int) -> None:
    log = SharedRotatingFile(Path(path), max_bytes=4000, backups=1000)
    for i in range(count):
        log.write(f"writer {writer} line {i:04d} {'.' * 60}\n".encode())  # 84 bytes
    log.close()


def test_several_processes_share_one_rotating_log_and_lose_no_line(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "access.log"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_append_lines, args=(str(path), w, 300)) for w in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    files = [p for p in (tmp_path / "logs").iterdir() if p.name.startswith("access.log")]
    lines = [line for p in files for line in p.read_text().splitlines()]
    assert sorted(lines) == sorted(
        f"writer {w} line {i:04d} {'.' * 60}" for w in range(3) for i in range(300)
    )
    # Rotated by the file's own size, not each writer's share of it (a line or two of
    # each other writer may land in a file just rotated).
    assert len(files) >= 900 * 84 // 4000
    assert all(p.stat().st_size <= 4000 + 2 * 84 for p in files)


# `appliance logs`, against a home laid out as the appliance writes it.

STAMP = "%Y-%m-%d %H:%M:%S"


def _logs_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    logs = home / "logs"
    logs.mkdir(parents=True)
    now = time.time()
    old, recent = time.strftime(STAMP, time.localtime(now - 3600)), time.strftime(STAMP)
    (logs / "gateway.log.1").write_text(f"{old},000 INFO appliance.gateway: an hour ago\n")
    (logs / "gateway.log").write_text(
        f"{recent},000 WARNING appliance.gateway: just now\nTraceback (a continuation)\n"
        + "".join(f"{recent},000 INFO appliance.gateway: line {i}\n" for i in range(30))
    )
    os.utime(logs / "gateway.log.1", (now - 3600, now - 3600))
    (logs / "engine-llama-3-aaaa.log").write_text("INFO 01-01 00:00:00 [x.py:1] older replica\n")
    os.utime(logs / "engine-llama-3-aaaa.log", (now - 60, now - 60))
    (logs / "engine-llama-3-bbbb.log").write_text("INFO 01-01 00:00:00 [x.py:1] newer replica\n")
    (logs / "engine-llama-cccc.log").write_text("another model whose name is a prefix\n")
    return home


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr("appliance.config.SEARCH_PATHS", ())
    return Cli(capsys)


def _in(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", str(home))


def test_logs_reads_back_through_rotated_files(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    _in(monkeypatch, _logs_home(tmp_path))
    tail = cli("logs", "gateway", "--lines", "3")
    assert tail.code == 0, tail.err
    assert tail.out.splitlines() == [ln for ln in tail.out.splitlines() if "line" in ln]
    assert [ln.rsplit(" ", 1)[1] for ln in tail.out.splitlines()] == ["27", "28", "29"]
    every = cli("logs", "gateway", "--lines", "1000").out
    assert every.index("an hour ago") < every.index("just now")  # oldest first
    recent = cli("logs", "gateway", "--since", "10m").out
    assert "an hour ago" not in recent and "just now" in recent
    assert "Traceback (a continuation)" in recent  # goes with the line before it
    assert len(cli("logs", "gateway", "--since", "2h").out.splitlines()) == 33


def test_engine_logs_are_the_newest_replicas_or_all(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    _in(monkeypatch, _logs_home(tmp_path))
    newest = cli("logs", "engine", "llama-3")
    assert newest.code == 0 and newest.out.strip().endswith("newer replica")
    both = cli("logs", "engine", "llama-3", "--all").out.splitlines()
    assert sorted(both) == sorted(
        ["bbbb | INFO 01-01 00:00:00 [x.py:1] newer replica",
         "aaaa | INFO 01-01 00:00:00 [x.py:1] older replica"]
    )  # fmt: skip
    assert "prefix" in cli("logs", "engine", "llama").out


def test_logs_errors_name_the_files_that_exist(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    _in(monkeypatch, _logs_home(tmp_path))
    listed = cli("logs")
    assert listed.code == 0 and "engine-llama-3-bbbb.log" in listed.out
    for args, words in [
        (("engine", "mistral"), ["no engine log for 'mistral'", "llama, llama-3"]),
        (("engine",), ["name the model", "llama, llama-3"]),
        (("supervisor",), ["no supervisor log", "gateway.log", "engine-llama-cccc.log"]),
        (("sideways",), ["no 'sideways' log", "gateway, supervisor, access, engine"]),
        (("gateway", "x"), ["only engine logs take a model"]),
        (("gateway", "--since", "yesterday-ish"), ["cannot read 'yesterday-ish' as a time"]),
    ]:
        shown = cli("logs", *args)
        text = " ".join(shown.err.split())
        assert shown.code == 1 and "Traceback" not in shown.err, shown.err
        assert all(w in text for w in words), (args, text)
    _in(monkeypatch, tmp_path / "nowhere")
    empty = cli("logs")
    assert empty.code == 1 and "there are no logs in" in empty.err


def test_logs_follow_a_file_across_its_rotation(tmp_path: Path) -> None:
    home = _logs_home(tmp_path)
    path = home / "logs" / "access.log"
    path.write_text('{"time":"2026-01-01T00:00:00.000Z","n":0}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "logs", "access", "-f", "--lines", "1"],
        stdout=subprocess.PIPE,
        env={**env, "APPLIANCE_HOME": str(home)},
        # Ctrl-C as at a terminal: a run started in the background (nohup, `&` in a script)
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        assert b'"n":0' in proc.stdout.readline()
        log = SharedRotatingFile(path, max_bytes=200, backups=3)
        for n in range(1, 9):  # 40-odd bytes a line: rotates every few lines
            log.write(f'{{"time":"2026-01-01T00:00:00.000Z","n":{n}}}\n'.encode())
            time.sleep(0.3)  # slower than the poll: each rotation is seen
        log.close()
        assert (home / "logs" / "access.log.1").exists()
        seen = [proc.stdout.readline() for _ in range(8)]
        assert [int(line.split(b'"n":')[1].rstrip(b"}\n")) for line in seen] == list(range(1, 9))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert proc.returncode == 0
