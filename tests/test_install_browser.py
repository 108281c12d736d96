"""``scripts/install-browser.sh`` waits for another apt/dpkg process instead of failing at once.

apt, dpkg and the system tools are replaced by stubs on PATH: nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-browser.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def run_script(tmp_path: Path, busy_checks: int, wait_seconds: int = 600) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the script with the lock held for the first ``busy_checks`` checks; returns the log of calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    counter = tmp_path / "fuser.count"
    stub(bin_dir, "id", "echo 0")
    stub(bin_dir, "sleep", f'echo "sleep $*" >> {log}')
    stub(
        bin_dir,
        "fuser",
        f'n=0; [ -f {counter} ] && read -r n < {counter}; n=$((n + 1)); echo $n > {counter}; '
        f'echo "fuser" >> {log}; [ $n -le {busy_checks} ]',  # builtins only: PATH holds the stubs alone
    )
    stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    environment = {"PATH": str(bin_dir), "APT_LOCK_WAIT_SECONDS": str(wait_seconds), "HOME": str(tmp_path)}
    result = subprocess.run(
        [BASH, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=environment, cwd=tmp_path
    )
    return result, log


def test_waits_for_the_lock_with_a_message_then_installs(tmp_path: Path) -> None:
    result, log = run_script(tmp_path, busy_checks=3)
    assert result.returncode == 0, result.stderr
    assert "another apt/dpkg process holds the package lock; waiting for it (up to 600 s)" in result.stderr
    assert "the package lock is free after 15 s" in result.stderr
    calls = log.read_text().splitlines()
    assert calls.count("sleep 5") == 3
    apt_calls = [call for call in calls if call.startswith("apt-get")]
    assert len(apt_calls) == 2 and "update" in apt_calls[0] and "install" in apt_calls[1] and "chromium" in apt_calls[1]
    assert all("DPkg::Lock::Timeout=600" in call for call in apt_calls)  # apt waits too, between our checks
    assert calls.index(apt_calls[0]) > calls.index("sleep 5")  # no apt-get while the lock was held


def test_gives_up_with_a_clear_message_when_the_lock_stays_held(tmp_path: Path) -> None:
    result, log = run_script(tmp_path, busy_checks=10**6, wait_seconds=20)
    assert result.returncode == 1
    assert "still holds the package lock after 20 s" in result.stderr and "APT_LOCK_WAIT_SECONDS" in result.stderr
    assert "apt-get" not in log.read_text()


def test_no_wait_and_no_message_when_the_lock_is_free(tmp_path: Path) -> None:
    result, log = run_script(tmp_path, busy_checks=0)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "sleep" not in log.read_text()


def test_does_nothing_when_chromium_is_installed(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    stub(tmp_path / "bin", "chromium", "exit 0")
    result = subprocess.run(
        [BASH, str(SCRIPT)], capture_output=True, text=True, timeout=60, env={"PATH": str(tmp_path / "bin")}
    )
    assert result.returncode == 0 and result.stderr == ""
