"""The web app: cache directory, reuse / mismatch / damage handling, ports, Voila missing, the
notebook it serves, and one real start of `scorecam-explorer app`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _tiny_models import tiny_model, write_images

from scorecam_explorer import cli, webapp
from scorecam_explorer.cache import load_cache, save_cache
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError, ScorecamError
from scorecam_explorer.serving.status import ENV_APP_STATUS


@pytest.fixture
def pictures(tmp_path) -> list[str]:
    return [str(path) for path in write_images(tmp_path / "pictures", 2)]


def quiet(_message: str) -> None:
    pass


def prepare(**options):
    options.setdefault("model_name", "tiny")
    options.setdefault("progress", False)
    return webapp.prepare_cache(log=quiet, **options)


# ---- where caches go --------------------------------------------------------------------


def test_cache_dir_prefers_the_variable_then_xdg_then_home(monkeypatch, tmp_path) -> None:
    assert webapp.cache_dir({webapp.ENV_CACHE_DIR: str(tmp_path / "a"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "a"
    assert webapp.cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "scorecam_explorer"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert webapp.cache_dir({}) == tmp_path / "home" / ".cache" / "scorecam_explorer"


def test_default_cache_path_names_model_weights_picture_and_convention(tmp_path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = webapp.default_cache_path("resnet18", "0123456789abcdef", "sample:chelsea", pixels, "paper", tmp_path)
    assert path.parent == tmp_path and path.suffix == ".zarr"
    assert path.name.startswith("resnet18-01234567-chelsea-") and path.name.endswith("-paper.zarr")
    other = pixels.copy()
    other[0, 0, 0] ^= 1
    assert webapp.picture_hash(other) != webapp.picture_hash(pixels)
    assert webapp.default_cache_path("resnet18", "0123456789abcdef", "sample:chelsea", other, "paper", tmp_path) != path
    assert webapp.picture_hash(pixels.reshape(4, 16, 3)) != webapp.picture_hash(pixels)  # shape counts


def test_default_layers_take_the_deepest_stages_and_the_default_layer(tiny_models) -> None:
    assert webapp.default_layers(tiny_model()) == ["features.1", "features"]


# ---- computing, reusing, refusing --------------------------------------------------------


def test_first_run_computes_then_later_runs_reuse(tiny_models, cache_home, pictures) -> None:
    first = prepare(image=pictures[0])
    assert first.status == "computed" and first.path.parent == cache_home and first.path.exists()
    assert first.layers == ["features.1", "features"]
    again = prepare(image=pictures[0])
    assert again.status == "reused" and again.path == first.path
    # another picture or other weights: another file, computed
    assert prepare(image=pictures[1]).path != first.path
    other_weights = prepare(image=pictures[0], weights="3")
    assert other_weights.status == "computed" and other_weights.path != first.path


def test_a_cache_for_other_weights_or_another_picture_is_refused(tiny_models, tmp_path, pictures) -> None:
    path = tmp_path / "mine.zarr"
    assert prepare(image=pictures[0], cache_path=path).status == "computed"
    with pytest.raises(CacheError, match="other weights.*--recompute"):
        prepare(image=pictures[0], cache_path=path, weights="5")
    with pytest.raises(CacheError, match="another picture.*--recompute"):
        prepare(image=pictures[1], cache_path=path)
    with pytest.raises(CacheError, match="convention.*--recompute"):
        prepare(image=pictures[0], cache_path=path, convention="torchcam")
    redone = prepare(image=pictures[1], cache_path=path, recompute=True)
    assert redone.status == "computed"
    assert str(load_cache(path)["image"].values[0]) == Path(pictures[1]).name


def test_missing_layers_are_added_to_a_reused_cache(tiny_models, tmp_path, pictures) -> None:
    path = tmp_path / "mine.zarr"
    prepare(image=pictures[0], cache_path=path, layers=["features.4"])
    extended = prepare(image=pictures[0], cache_path=path, layers=["features.1", "features.4"])
    assert extended.status == "extended" and extended.layers == ["features.1", "features.4"]
    reference = compute_cache(tiny_model(), pictures[0], ["features.1"], progress=False)
    assert np.allclose(load_cache(path)["features.1"]["masked_logits"].values, reference["features.1"]["masked_logits"].values, atol=1e-5)


def test_a_damaged_cache_is_refused_with_the_reason_and_recompute_replaces_it(tiny_models, tmp_path, pictures) -> None:
    path = tmp_path / "mine.zarr"
    prepare(image=pictures[0], cache_path=path)
    (path / "zarr.json").write_text("{ not json")
    with pytest.raises(CacheError, match=r"cannot be used: .*not a readable cache.*--recompute"):
        prepare(image=pictures[0], cache_path=path)
    with pytest.raises(CacheError, match="--recompute"):  # the same when only the path is given
        prepare(model_name=None, cache_path=path)
    assert prepare(image=pictures[0], cache_path=path, recompute=True).status == "computed"
    load_cache(path)  # valid again


def test_recompute_never_replaces_a_folder_that_is_not_a_cache(tiny_models, tmp_path, pictures) -> None:
    folder = tmp_path / "photos.zarr"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a scorecam_explorer cache"):
        prepare(image=pictures[0], cache_path=folder, recompute=True)
    assert (folder / "keep.txt").read_text() == "mine"


def test_a_cache_given_by_path_alone_is_served_as_it_is_without_the_model(tiny_models, tmp_path, pictures) -> None:
    path = save_cache(compute_cache(tiny_model(), pictures[0], ["features.4"], progress=False), tmp_path / "c.zarr")
    tiny_models.clear()
    opened = prepare(model_name=None, cache_path=path)
    assert opened.status == "opened" and opened.layers == ["features.4"] and opened.model_name == "tiny"
    assert tiny_models == []  # no model loaded


class FakeServer:
    """Stands in for :class:`webapp.AppServer`: records what the command reports."""

    def __init__(self) -> None:
        self.statuses: list = []
        self.expected = None

    def expect(self, candidate, **kwargs) -> None:
        self.expected = candidate

    def report(self, status) -> None:
        self.statuses.append(status)

    def ready(self, prepared, **kwargs) -> None:
        self.statuses.append(("ready", prepared.path, kwargs))

    def fail(self, message: str) -> None:
        self.statuses.append(("failed", message))

    def wait(self) -> int:
        return 0


@pytest.fixture
def fake_server(monkeypatch) -> FakeServer:
    import contextlib

    server = FakeServer()
    monkeypatch.setattr(webapp, "app_server", lambda *args, **kwargs: contextlib.nullcontext(server))
    return server


def test_weights_given_with_a_cache_path_are_checked_not_ignored(tiny_models, tmp_path, pictures, fake_server, capsys) -> None:
    path = save_cache(compute_cache(tiny_model(), pictures[0], ["features.4"], progress=False), tmp_path / "c.zarr")
    tiny_models.clear()
    status = cli.main(["app", "--cache", str(path), "--weights", "3", "--no-browser", "--port", str(webapp.free_port())])
    # the default model is loaded with those weights (the test registry knows only "tiny": refused)
    assert status == 2 and tiny_models == [("efficientnet_lite0", "3")]
    assert "efficientnet_lite0" in capsys.readouterr().err
    assert fake_server.statuses[-1][0] == "failed" and "efficientnet_lite0" in fake_server.statuses[-1][1]  # the page says it too


# ---- ports and Voila ------------------------------------------------------------------------


def test_a_port_in_use_gives_a_clear_error_with_the_port() -> None:
    with socket.socket() as busy:
        busy.bind((webapp.HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(webapp.PortInUseError, match=rf"port {port} on 127\.0\.0\.1 is in use.*--port \d+"):
            webapp.check_port(port)
    webapp.check_port(webapp.free_port())
    with pytest.raises(webapp.PortInUseError, match="not a valid TCP port"):
        webapp.check_port(70000)


def test_cli_reports_a_busy_port_before_computing_anything(tiny_models, capsys) -> None:
    with socket.socket() as busy:
        busy.bind((webapp.HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        status = cli.main(["app", "--no-browser", "--port", str(port), "--model", "tiny"])
    assert status == 2
    assert f"port {port}" in capsys.readouterr().err
    assert tiny_models == []


def test_missing_voila_says_how_to_install_the_extra(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "voila" else real(name, *a))
    with pytest.raises(webapp.AppUnavailableError, match=r'pip install "scorecam-explorer\[app\]"'):
        webapp.require_voila()
    assert cli.main(["app", "--no-browser"]) == 2
    assert 'pip install "scorecam-explorer[app]"' in capsys.readouterr().err


def test_voila_runs_this_interpreter_on_localhost(tmp_path) -> None:
    data_dir = webapp.write_kernel_spec(tmp_path)
    spec = json.loads((data_dir / "kernels" / "python3" / "kernel.json").read_text())
    assert spec["argv"][:3] == [sys.executable, "-m", "scorecam_explorer.serving.kernel"]
    command = webapp.voila_command(webapp.notebook_path(), 9999)
    assert command[:3] == [sys.executable, "-m", "scorecam_explorer.serving.voila_main"] and "--port=9999" in command
    assert "--Voila.ip=127.0.0.1" in command and "--no-browser" in command
    assert "--KernelManager.transport=ipc" in command  # kernels on Unix sockets, not TCP ports
    env = webapp.app_environment(tmp_path / "status.json", jupyter_dir=data_dir, base={webapp.ENV_APP_CACHE: "old"})
    assert env[ENV_APP_STATUS] == str((tmp_path / "status.json").resolve())
    assert webapp.ENV_APP_CACHE not in env and env["JUPYTER_PATH"] == str(data_dir)
    assert webapp.notebook_path().is_file()


# ---- the notebook the app serves --------------------------------------------------------------


def test_explorer_from_environment_loads_the_model_only_when_asked(tiny_models, tmp_path, pictures) -> None:
    path = save_cache(compute_cache(tiny_model(), pictures[0], ["features.4"], progress=False), tmp_path / "c.zarr")
    tiny_models.clear()
    explorer = webapp.explorer_from_environment({webapp.ENV_APP_CACHE: str(path), webapp.ENV_APP_MODEL: ""})
    assert explorer.state.layers == ["features.4"] and tiny_models == []
    explorer.controls.load_model.click()  # the model named in the cache, loaded now
    assert tiny_models == [("tiny", "DEFAULT")] and "features.1" in explorer.controls.new_layer.options
    with pytest.raises(ScorecamError, match="scorecam-explorer app"):
        webapp.explorer_from_environment({})


@pytest.mark.notebook
def test_the_app_notebook_runs_and_shows_the_explorer(tmp_path, pictures, monkeypatch) -> None:
    import nbclient
    import nbformat

    path = save_cache(compute_cache(tiny_model(), pictures[0], ["features.4"], progress=False), tmp_path / "c.zarr")
    monkeypatch.setenv("JUPYTER_PATH", str(webapp.write_kernel_spec(tmp_path / "jupyter")))
    monkeypatch.setenv(webapp.ENV_APP_CACHE, str(path))
    monkeypatch.setenv(webapp.ENV_APP_MODEL, "")
    notebook = nbformat.read(webapp.notebook_path(), as_version=4)
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3").execute()
    outputs = notebook.cells[-1].outputs
    assert any("application/vnd.jupyter.widget-view+json" in output.get("data", {}) for output in outputs), outputs


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("scorecam-explorer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scorecam_explorer.cli"]


def test_app_command_serves_the_explorer_until_stopped(tmp_path, pictures) -> None:
    path = save_cache(compute_cache(tiny_model(), pictures[0], ["features.4"], progress=False), tmp_path / "c.zarr")
    port = webapp.free_port()
    env = {**os.environ, webapp.ENV_CACHE_DIR: str(tmp_path / "home")}
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*_console_script(), "app", "--no-browser", "--port", str(port), "--cache", str(path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        # serving: the URL is printed once Voila answers, the cache line once it is ready
        while time.monotonic() < deadline and process.poll() is None:
            output = log_path.read_text()
            if f"http://127.0.0.1:{port}/" in output and "opened as it is" in output:
                break
            time.sleep(0.3)
        with urllib.request.urlopen(webapp.static_url(port), timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log_path.read_text()
    assert f"http://127.0.0.1:{port}/" in output and "opened as it is" in output, output
    assert "without encryption" not in output and "is not trusted" not in output, output  # quiet logs
    webapp.check_port(port)  # Voila stopped with it: the port is free again
