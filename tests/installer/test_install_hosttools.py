"""require_tools: a missing program is installed where the tests may, else the test skips
with the reason and the package to install (never a FileNotFoundError mid-test)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.installer import testhosts
from tests.installer.testhosts import HOST_TOOLS, NO_INSTALL_ENV, require_tools


@pytest.fixture
def no_nft(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """A machine with apt-get but without nft; records apt-get calls instead of running them."""
    real_which = shutil.which
    fake = {"nft": None, "apt-get": "/usr/bin/apt-get"}
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: fake[name] if name in fake else real_which(name)
    )
    calls: list[tuple[str, ...]] = []

    def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(["apt-get", *args], 100, "", "E: no such package")

    monkeypatch.setattr(testhosts, "_apt_get", apt_get)
    monkeypatch.setattr(testhosts, "_apt_updated", False)
    monkeypatch.delenv(NO_INSTALL_ENV, raising=False)
    return calls


def test_every_tool_names_its_debian_package() -> None:
    assert HOST_TOOLS["nft"] == "nftables"
    assert HOST_TOOLS["debootstrap"] == "debootstrap"
    assert all(HOST_TOOLS.values())


def test_present_tools_need_nothing(no_nft: list[tuple[str, ...]]) -> None:
    require_tools("chroot")  # coreutils: on every Debian machine
    assert no_nft == []


def test_without_root_the_test_skips_naming_tool_and_package(
    no_nft: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testhosts.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_tools("nft")
    assert "needs nft (Debian package nftables)" in str(skipped.value)
    assert "apt-get install nftables" in str(skipped.value)
    assert no_nft == []  # nothing is installed without root


def test_the_opt_out_skips_instead_of_installing(
    no_nft: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testhosts.os, "geteuid", lambda: 0)
    monkeypatch.setenv(NO_INSTALL_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match=f"{NO_INSTALL_ENV}=1 forbids"):
        require_tools("nft")
    assert no_nft == []


def test_as_root_it_installs_and_refreshes_the_lists_once_when_that_fails(
    no_nft: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testhosts.os, "geteuid", lambda: 0)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_tools("nft", "chroot")
    install = ("install", "-y", "--no-install-recommends", "nftables")
    assert no_nft == [install, ("update",), install]
    assert "did not provide nft: E: no such package" in str(skipped.value)
