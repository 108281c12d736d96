"""``make app`` installs nothing when nothing changed (scripts/setup.sh and its stamps)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the files setup.sh reads, and a venv whose python only logs its arguments."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "constraints.txt", "scripts/setup.sh"):
        shutil.copy(REPO / name, root / name)
    log = tmp_path / "pip.log"
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    python.chmod(0o755)
    return root, log


def setup(root: Path, extras: str) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("VENV", None)
    subprocess.run(["bash", "scripts/setup.sh", extras], cwd=root, env=env, check=True, capture_output=True)


def test_setup_installs_once_then_nothing_until_the_requirements_change(tmp_path) -> None:
    root, log = fake_checkout(tmp_path)
    setup(root, "app")
    assert "pip install" in log.read_text() and "-e .[app]" in log.read_text()
    log.unlink()
    setup(root, "app")
    os.utime(root / "pyproject.toml")  # touched, not changed (a checkout, an undone edit)
    setup(root, "app")
    assert not log.exists(), "pip ran although nothing changed"
    with open(root / "constraints.txt", "a") as stream:
        stream.write("\n# changed\n")
    setup(root, "app")
    assert "pip install" in log.read_text()


def test_after_the_test_extra_the_app_needs_nothing_more(tmp_path) -> None:
    root, log = fake_checkout(tmp_path)
    setup(root, "test")
    log.unlink()
    setup(root, "app")  # the test extra includes voila and ipykernel
    assert not log.exists(), "make app re-ran pip after make test"
