"""The package's metadata: pyproject, environment.yml, the README's commands, CI."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_console_script_and_python() -> None:
    project = _pyproject()["project"]
    assert project["scripts"]["scorecam-explorer"] == "scorecam_explorer.cli:main"
    assert project["requires-python"] == ">=3.10"
    for extra in ("test", "app", "bench", "distributed"):
        assert extra in project["optional-dependencies"]
    # ranges, not pins, for users
    assert not [r for r in project["dependencies"] if "==" in r]


# conda-forge names of pip packages where they differ
CONDA_NAMES = {"torch": "pytorch"}


def test_environment_yml_lists_every_core_dependency() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_requirement_name(d) for d in environment["dependencies"] if isinstance(d, str)}
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    pip = {_requirement_name(d) for d in pip_section}
    missing = [
        name
        for name in map(_requirement_name, _pyproject()["project"]["dependencies"])
        if CONDA_NAMES.get(name, name) not in conda and name not in pip
    ]
    assert not missing, f"environment.yml lacks {missing}"
    assert "-e ." in pip_section  # then the package itself


def test_readme_gives_exactly_two_setup_commands_and_ci_calls_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```(?:bash|sh)\n(.+?)\n```", readme, flags=re.M | re.S)
    quickstart = [c for c in commands if c.strip() in ("make app", "make test")]
    assert sorted(c.strip() for c in quickstart) == ["make app", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_samples_and_type_marker_are_package_data() -> None:
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]["scorecam_explorer"]
    assert "samples/*.jpg" in package_data and "py.typed" in package_data


def test_importing_the_package_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys; import scorecam_explorer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_every_public_name_resolves() -> None:
    import scorecam_explorer

    for name in scorecam_explorer.__all__:
        assert getattr(scorecam_explorer, name) is not None, name


def test_readme_names_every_notebook() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"`{notebook.stem}`" in section or f"notebooks/{notebook.stem}`" in section, notebook.stem


def test_readme_command_lines_show_the_app_and_map_options() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    app = block.split("scorecam-explorer app", 1)[1].split("scorecam-explorer evaluate", 1)[0]
    for option in ("--model", "--weights", "--image", "--layer", "--convention", "--cache", "--recompute", "--host",
                   "--port", "--no-browser"):
        assert option in app, option
    assert "port 8866 by default" in readme


def test_every_bundled_sample_is_package_data_attributed_and_small() -> None:
    import fnmatch

    from PIL import Image

    from scorecam_explorer.images import sample_names

    folder = ROOT / "scorecam_explorer" / "samples"
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["scorecam_explorer"]
    files = sorted(p for p in folder.iterdir() if p.name != "__pycache__")
    unpackaged = [p.name for p in files if not any(fnmatch.fnmatch(f"samples/{p.name}", pattern) for pattern in patterns)]
    assert not unpackaged, f"not in package-data: {unpackaged}"
    names = sample_names()
    assert len(names) >= 12  # the offline demo set
    assert names == sorted(p.stem for p in files if p.suffix == ".jpg")
    attribution = (folder / "ATTRIBUTION.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|[^|]+\|[^|]+\| ([^|]+) \|$", attribution, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(f"{name}.jpg" for name in names)
    assert all(re.search(r"CC0|public domain", licence) for _, licence in rows)
    for name in names:
        with Image.open(folder / f"{name}.jpg") as picture:
            assert picture.format == "JPEG" and picture.mode == "RGB", name
            assert max(picture.size) <= 640, name
    total = sum(p.stat().st_size for p in files)
    assert total < 1_000_000, f"the samples take {total} bytes; keep the package small"
