"""`appliance logs`: the files under `<home>/logs/`, read and followed as an admin would.

Each log rotates by size (`x.log` becomes `x.log.1`, ...), so reading goes back through
the rotated files and following notices when the file it reads is replaced. Lines are
copied as they are (they are data: never read as markup). `--since` goes by each line's
own time; a line without one (a traceback's continuation) goes with the line before it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import typer

from appliance.cli.common import config_of, console, print_table
from appliance.errors import ApplianceError
from appliance.keys import parse_duration

COMPONENTS = ("gateway", "supervisor", "access", "engine")
FOLLOW_POLL_S = 0.2
_BLOCK = 64 * 1024
# engine-<model>-<replica id>.log: Serve's replica ids have no '-', model names may.
_ENGINE = re.compile(r"engine-(?P<model>.+)-(?P<replica>[^-]+)\.log")
# 2026-12-02 06:10:23,714 (Python logging's asctime, local time)
_ASCTIME = re.compile(rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
# "time":"2026-12-02T06:10:24.973Z" (the access log, UTC)
_ACCESS = re.compile(rb'"time":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z"')
# INFO 12-02 06:10:23 (vLLM's own format: no year)
_VLLM = re.compile(rb"\b(\d\d-\d\d \d\d:\d\d:\d\d)\b")


def _stamp(component: str) -> Callable[[bytes], float | None]:
    """How to read the time of one line of this component's log."""

    def asctime(line: bytes) -> float | None:
        m = _ASCTIME.match(line)
        return time.mktime(time.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S")) if m else None

    def access(line: bytes) -> float | None:
        m = _ACCESS.search(line, 0, 64)
        if not m:
            return None
        return datetime.fromisoformat(m.group(1).decode()).replace(tzinfo=UTC).timestamp()

    def engine(line: bytes) -> float | None:
        m = _VLLM.search(line, 0, 64)
        if not m:
            return asctime(line)
        year = time.localtime().tm_year
        return time.mktime(time.strptime(f"{year}-{m.group(1).decode()}", "%Y-%m-%d %H:%M:%S"))

    return {"access": access, "engine": engine}.get(component, asctime)


@dataclass(frozen=True)
class LogFile:
    """One log and its rotated predecessors, oldest first."""

    path: Path
    label: str  # what to prefix its lines with when several are shown together

    def generations(self) -> list[Path]:
        rotated = []
        for p in self.path.parent.glob(self.path.name + ".*"):
            suffix = p.name[len(self.path.name) + 1 :]
            if suffix.isdigit():
                rotated.append((int(suffix), p))
        paths = [p for _, p in sorted(rotated, reverse=True)]
        return [*paths, self.path] if self.path.exists() else paths


def _existing(log_dir: Path) -> list[str]:
    return sorted(p.name for p in log_dir.glob("*.log")) if log_dir.is_dir() else []


def _engine_logs(log_dir: Path) -> dict[str, list[Path]]:
    """Engine logs by model, newest first."""
    found: dict[str, list[Path]] = {}
    for path in log_dir.glob("engine-*.log"):
        m = _ENGINE.fullmatch(path.name)
        if m:
            found.setdefault(m.group("model"), []).append(path)
    for paths in found.values():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def _pick(log_dir: Path, component: str, model: str | None, every: bool) -> list[LogFile]:
    there = _existing(log_dir)
    listing = ", ".join(there) if there else "none"
    if component not in COMPONENTS:
        raise ApplianceError(
            f"there is no {component!r} log",
            hint=f"Name one of: {', '.join(COMPONENTS)} (engine takes the model: "
            f"`appliance logs engine MODEL`). Logs in {log_dir}: {listing}.",
        )
    if component == "engine":
        engines = _engine_logs(log_dir)
        models = ", ".join(sorted(engines)) or "none"
        if model is None:
            raise ApplianceError(
                "name the model whose engine log to show",
                hint=f"`appliance logs engine MODEL`; engine logs exist for: {models}.",
            )
        if model not in engines:
            raise ApplianceError(
                f"no engine log for {model!r} in {log_dir}",
                hint=f"Engine logs exist for: {models}. A model's engine logs once one of "
                "its replicas has started (`appliance status`).",
            )
        paths = engines[model] if every else engines[model][:1]
        return [LogFile(p, _ENGINE.fullmatch(p.name).group("replica")) for p in paths]  # type: ignore[union-attr]
    if model is not None:
        raise ApplianceError(
            f"only engine logs take a model, not the {component} log",
            hint=f"`appliance logs {component}`, or `appliance logs engine {model}`.",
        )
    log = LogFile(log_dir / f"{component}.log", component)
    if not log.generations():
        raise ApplianceError(
            f"no {component} log in {log_dir}",
            hint=f"Logs there: {listing}. "
            + {
                "gateway": "The gateway writes it once `appliance up` has started it.",
                "supervisor": "`appliance up` writes it (not with --foreground, which logs "
                "to the terminal).",
                "access": "The gateway writes a line for each request it serves.",
            }[component],
        )
    return [log]


def _tail(paths: list[Path], n: int, stop_at: int | None = None) -> list[bytes]:
    """The last `n` lines across the files (oldest first), read from their ends; the last
    file only up to `stop_at` bytes (where following takes over)."""
    lines: list[bytes] = []
    for i, path in enumerate(reversed(paths)):
        want = n - len(lines)
        if want <= 0:
            break
        try:
            with path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                if i == 0 and stop_at is not None:
                    end = min(end, stop_at)
                data, pos = b"", end
                while pos > 0 and data.count(b"\n") <= want:
                    step = min(_BLOCK, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
        except OSError:
            continue
        found = data.splitlines(keepends=True)
        if pos > 0:
            found = found[1:]  # the first is only the end of a line
        lines = found[-want:] + lines
    return lines


def _since(
    paths: list[Path], start: float, stamp: Callable[[bytes], float | None]
) -> Iterator[bytes]:
    """Lines written at `start` or later; files last written before it are skipped."""
    for path in paths:
        try:
            if path.stat().st_mtime < start:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        current: float | None = None
        for line in data.splitlines(keepends=True):
            when = stamp(line)
            if when is not None:
                current = when
            if current is None or current >= start:
                yield line


def _start_of(text: str) -> float:
    seconds = parse_duration(text)
    if seconds is not None:
        return time.time() - seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApplianceError(
            f"cannot read {text!r} as a time",
            hint="Give how long ago (10m, 2h, 1d) or a date and time (2026-12-02T06:00).",
        ) from None
    return moment.timestamp()


class _Follower:
    """Reads what is appended to one log, across rotations (the path gets a new file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("rb") if path.exists() else None
        self.offset = self.file.seek(0, os.SEEK_END) if self.file is not None else 0
        self.partial = b""

    def lines(self) -> list[bytes]:
        out: list[bytes] = []
        if self.file is not None:
            out += self._read()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return out
        if self.file is None or os.fstat(self.file.fileno()).st_ino != current.st_ino:
            # Rotated: what the old file got last was read above; now the new one, whole.
            if self.file is not None:
                self.file.close()
            self.file = self.path.open("rb")
            out += self._read()
        elif current.st_size < self.file.tell():  # truncated in place
            self.file.seek(0)
            out += self._read()
        return out

    def _read(self) -> list[bytes]:
        assert self.file is not None
        data = self.partial + self.file.read()
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].splitlines(keepends=True)


def _write(lines: Iterator[bytes] | list[bytes], prefix: bytes = b"") -> None:
    out = sys.stdout.buffer
    for line in lines:
        out.write(prefix + line if prefix else line)
        if not line.endswith(b"\n"):
            out.write(b"\n")
    out.flush()


def logs(
    ctx: typer.Context,
    component: str | None = typer.Argument(
        None, help="gateway, supervisor, access or engine (then the model). None: list them."
    ),
    model: str | None = typer.Argument(None, help="The model, for engine logs."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    since: str | None = typer.Option(
        None, "--since", help="Only lines from this long ago (10m, 2h) or this time on."
    ),
    lines: int | None = typer.Option(
        None, "--lines", "-n", min=0, help="The last N lines (default 20, or all with --since)."
    ),
    every: bool = typer.Option(
        False, "--all", help="Engine logs: every replica's, not only the newest."
    ),
) -> None:
    """Show the appliance's logs (the files in <home>/logs), following them with -f."""
    config = config_of(ctx)
    log_dir = config.log_dir
    if component is None:
        there = sorted(p for p in log_dir.glob("*.log*") if not p.name.startswith("."))
        there = there if log_dir.is_dir() else []
        if not there:
            raise ApplianceError(
                f"there are no logs in {log_dir} yet",
                hint="The appliance writes them once it has run (`appliance up`); "
                "`appliance config` shows the home it uses.",
            )
        rows = []
        for p in there:
            st = p.stat()
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
            rows.append([p.name, f"{st.st_size:,}", when])
        console.print(f"Logs in {log_dir}:")
        print_table(["file", "bytes", "last written"], rows)
        return
    chosen = _pick(log_dir, component, model, every)
    several = len(chosen) > 1
    # Followers first, so that nothing written while the past is printed is missed.
    followers = [_Follower(log.path) if follow else None for log in chosen]
    for log, follower in zip(chosen, followers, strict=True):
        paths = log.generations()
        prefix = f"{log.label} | ".encode() if several else b""
        if since is not None:
            selected = list(_since(paths, _start_of(since), _stamp(component)))
            _write(selected[-lines:] if lines else selected, prefix)
        else:
            stop_at = follower.offset if follower is not None else None
            _write(_tail(paths, 20 if lines is None else lines, stop_at), prefix)
    if not follow:
        return
    try:
        while True:
            for log, follower in zip(chosen, followers, strict=True):
                assert follower is not None
                new = follower.lines()
                if new:
                    _write(new, f"{log.label} | ".encode() if several else b"")
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return
