"""`appliance bundle`: progress, the engine images it lacks, and where it writes."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from appliance import versions
from appliance.errors import InstallError
from appliance.installer.bundle import image_names, is_deb, missing_images
from tests.installer.conftest import BundleRun
from tests.installer.test_install_cli import cli, text

VLLM = f"appliance/engine-vllm:{versions.VLLM}"
TRTLLM = f"appliance/engine-trtllm:{versions.TRTLLM}"


def archive(path: Path, files: dict[str, object]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def docker_save(path: Path, *tags: str) -> Path:
    """The layout `docker save` and podman's docker-archive write: manifest.json."""
    return archive(
        path,
        {"manifest.json": [{"Config": "blobs/sha256/c0", "RepoTags": list(tags), "Layers": []}]},
    )


def oci_archive(path: Path, annotations: dict[str, str]) -> Path:
    """An OCI image layout: index.json whose manifests carry the name annotations."""
    manifest = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "0" * 64,
        "size": 1,
        "annotations": annotations,
    }
    return archive(
        path,
        {"oci-layout": {"imageLayoutVersion": "1.0.0"}, "index.json": {"manifests": [manifest]}},
    )


def test_image_names_of_docker_and_oci_archives(tmp_path: Path) -> None:
    assert image_names(docker_save(tmp_path / "d.tar", VLLM)) == {VLLM}
    # Docker 25+ writes both files; containerd's annotation has the registry in front.
    docker25 = oci_archive(
        tmp_path / "o.tar",
        {
            "io.containerd.image.name": f"docker.io/{TRTLLM}",
            "org.opencontainers.image.ref.name": "1.3.0rc5",
        },
    )
    assert image_names(docker25) == {TRTLLM}
    podman = oci_archive(
        tmp_path / "p.tar", {"org.opencontainers.image.ref.name": f"localhost/{VLLM}"}
    )
    assert image_names(podman) == {VLLM}


def test_a_file_that_is_no_image_archive_is_refused(tmp_path: Path) -> None:
    not_tar = tmp_path / "vllm.tar"
    not_tar.write_text("hello")
    with pytest.raises(InstallError, match="is not an image archive"):
        image_names(not_tar)
    with pytest.raises(InstallError, match=r"neither manifest\.json nor index\.json"):
        image_names(archive(tmp_path / "other.tar", {"readme.json": {}}))


def test_missing_images_names_the_engines_without_one(tmp_path: Path) -> None:
    wanted = {"vllm": VLLM, "trtllm": TRTLLM}
    assert missing_images(wanted, []) == wanted
    assert missing_images(wanted, [docker_save(tmp_path / "v.tar", VLLM)]) == {"trtllm": TRTLLM}
    other_tag = docker_save(tmp_path / "old.tar", "appliance/engine-vllm:0.28.0")
    assert missing_images(wanted, [other_tag]) == wanted


def test_bundle_shows_progress_creates_its_directory_and_names_missing_images(
    bundle_run: BundleRun,
) -> None:
    out = " ".join(bundle_run.output.split())
    assert f"Created the directory {bundle_run.path.parent}." in out
    for step in (
        "Building the appliance wheel",
        "Downloading the dependencies for Python 3.11 (pip download)",
        "more wheel(s) for Python 3.11",
        f"Writing {bundle_run.path}",
    ):
        assert re.search(rf"\[ *\d+s\] (\d+ )?{re.escape(step)}", out), step  # time so far
    assert f"Wrote {bundle_run.path}" in out
    assert f"warning: the bundle holds no image for vllm ({VLLM}), trtllm ({TRTLLM})" in out
    assert "images/build.sh --save" in out and "vllm trtllm" in out and "--image FILE" in out
    assert "warning: the bundle holds no Grafana package" in out and "--grafana-deb FILE" in out


def test_bundle_into_a_directory_is_refused_before_any_download(tmp_path: Path) -> None:
    proc = cli(tmp_path / "home", "bundle", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"error: {tmp_path} is a directory" in text(proc)
    assert "appliance-bundle.tar" in text(proc)
    assert "Traceback" not in text(proc)


def test_bundle_with_an_image_that_is_no_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "vllm.tar"
    bogus.write_text("not an image")
    proc = cli(tmp_path / "home", "bundle", str(tmp_path / "b.tar"), "--image", str(bogus))
    assert proc.returncode == 1
    assert f"error: {bogus} is not an image archive" in text(proc)
    assert not (tmp_path / "b.tar").exists()


def test_a_grafana_deb_that_is_no_debian_package_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "grafana.deb"
    bogus.write_text("not a package")
    proc = cli(tmp_path / "home", "bundle", str(tmp_path / "b.tar"), "--grafana-deb", str(bogus))
    assert proc.returncode == 1
    assert f"error: {bogus} is not a Debian package" in text(proc)
    assert "grafana.com/grafana/download" in text(proc)
    assert not (tmp_path / "b.tar").exists()


def test_is_deb_reads_the_ar_header(tmp_path: Path) -> None:
    deb = tmp_path / "grafana_11.6.0_amd64.deb"
    deb.write_bytes(b"!<arch>\ndebian-binary   1700000000  0     0     100644  4         `\n2.0\n")
    assert is_deb(deb)
    assert not is_deb(tmp_path / "missing.deb")
