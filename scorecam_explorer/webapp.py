"""The explorer as a web app: Voila serving it on 127.0.0.1.

``scorecam-explorer app`` (see :mod:`scorecam_explorer.commands.app`) calls, in order:

1. :func:`prepare_cache` (or :func:`prepare_dataset`), from
   :mod:`scorecam_explorer.serving.app_cache`: reuse the cache for this model, picture,
   convention and layers from the cache directory, after checking that it matches; compute
   what is missing, with progress; save atomically. A damaged cache is refused with the reason.
2. :class:`AppServer`: started before step 1 so that both run at once, it runs Voila
   (:mod:`scorecam_explorer.serving`) on the bundled notebook ``app/explorer.ipynb``. Every
   page's kernel follows a status file that the command writes (loading, computing layer k
   of n, ready, failed) and shows the explorer once the cache is ready. Closed pages'
   kernels are culled; above a session limit a visitor gets "the class is full".

Nothing here imports torch at module level: serving a saved cache as it is needs no model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scorecam_explorer.errors import ScorecamError
from scorecam_explorer.serving.app_cache import (  # which cache is served; re-exported for the command
    cache_dir,
    check_dataset_store,
    check_reusable,
    check_reusable_set,
    DEFAULT_APP_LAYERS,
    default_cache_path,
    DEFAULT_IMAGE,
    default_layers,
    default_set_cache_path,
    ENV_CACHE_DIR,
    index_dataset_for_app,
    is_dataset_store,
    masked_passes,
    open_existing,
    open_for_app,
    picture_hash,
    picture_set,
    pictures_hash,
    prepare_cache,
    prepare_dataset,
    prepare_picture_set,
    PreparedCache,
    progress_reporter,
    recall_cache,
    RECENT_CACHES,
    recent_key,
    remember_cache,
    replace_cache,
    Reporter,
    SAMPLES,
    StoreRows,
)
from scorecam_explorer.serving.options import LOCALHOST, ServeOptions
from scorecam_explorer.serving.options import voila_command as _voila_command
from scorecam_explorer.serving.status import ENV_APP_STATUS, AppStatus, write_status

if TYPE_CHECKING:
    from scorecam_explorer.explorer import Explorer

HOST = LOCALHOST
DEFAULT_PORT = 8866
INSTALL_HINT = 'pip install "scorecam-explorer[app]"'

ENV_APP_CACHE = "SCORECAM_EXPLORER_APP_CACHE"
"""The cache the app notebook opens (set by :func:`serve`)."""
ENV_APP_MODEL = "SCORECAM_EXPLORER_APP_MODEL"
"""The model name the app may load to add layers and run Grad-CAM ("" for none)."""
ENV_APP_WEIGHTS = "SCORECAM_EXPLORER_APP_WEIGHTS"
"""The weights argument for that model (``DEFAULT``, a path, or ``none``)."""


class PortInUseError(ScorecamError, OSError):
    """The port the app should listen on is taken."""


class AppUnavailableError(ScorecamError, ImportError):
    """Voila (the ``app`` extra) is not installed."""


# ---- serving ----------------------------------------------------------------------------


def require_voila() -> None:
    """Raise AppUnavailableError, saying how to install it, when Voila is missing."""
    missing = [name for name in ("voila", "ipykernel") if importlib.util.find_spec(name) is None]
    if missing:
        raise AppUnavailableError(
            f"the web app needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{INSTALL_HINT}"
        )


def free_port(host: str = HOST) -> int:
    """A port that is free on ``host`` now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def check_port(port: int, host: str = HOST) -> None:
    """Raise PortInUseError (with the port and a free alternative) if ``port`` is taken."""
    if not 0 < int(port) < 65536:
        raise PortInUseError(f"port {port} is not a valid TCP port (1-65535).")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: connections of an earlier run in TIME_WAIT do not block the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
            probe.listen(1)
        except OSError:
            raise PortInUseError(
                f"port {port} on {host} is in use (another server, or an app still running?); "
                f"choose a free one with --port, e.g. --port {free_port(host)}."
            ) from None


def notebook_path() -> Path:
    """The notebook Voila serves (inside the installed package)."""
    return Path(str(resources.files("scorecam_explorer") / "app" / "explorer.ipynb"))


def write_kernel_spec(data_dir: Path) -> Path:
    """A ``python3`` kernel spec running this interpreter, under ``data_dir/kernels``.

    Prepending ``data_dir`` to ``JUPYTER_PATH`` makes the app's kernel run in the same
    environment as the command, whatever other ``python3`` kernels are installed. The kernel
    starts through :mod:`scorecam_explorer.serving.kernel` (``ipykernel`` without a slow
    optional import).
    """
    spec_dir = data_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "scorecam_explorer.serving.kernel", "-f", "{connection_file}"],
        "display_name": "Python 3 (scorecam-explorer)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return data_dir


def voila_command(notebook: Path, port: int, host: str = HOST, options: ServeOptions | None = None) -> list[str]:
    """The command line that serves ``notebook`` on ``host:port`` (see :class:`ServeOptions`)."""
    from dataclasses import replace

    chosen = replace(options or ServeOptions(), host=host, port=int(port))
    return _voila_command(notebook, chosen)


def app_environment(status_path: Path, *, jupyter_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Voila and its kernels run in: the status file to follow, the kernel path."""
    env = dict(os.environ if base is None else base)
    env[ENV_APP_STATUS] = str(Path(status_path).resolve())
    for name in (ENV_APP_CACHE, ENV_APP_MODEL, ENV_APP_WEIGHTS):
        env.pop(name, None)  # the status file names the cache and model once they are ready
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(jupyter_dir), env.get("JUPYTER_PATH", "")]))
    return env


def static_url(port: int, host: str = HOST) -> str:
    """A static file of Voila's: it answers as soon as the server is up (``/`` starts a kernel)."""
    return f"http://{_url_host(host)}:{port}/voila/static/voila.js"


def _url_host(host: str) -> str:
    """The host to put in a URL for a server listening on ``host`` (any address: this machine)."""
    return LOCALHOST if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll ``url`` until it answers 200; False if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


class AppServer:
    """Voila serving the app notebook, and the status file its pages follow.

    :meth:`start` runs Voila at once (its pool of kernels starts while the command prepares
    the cache); :meth:`report` passes progress to the pages; :meth:`ready` tells them to open
    the cache; :meth:`fail` shows them why not; :meth:`wait` serves until Ctrl-C; :meth:`stop`
    stops Voila and its kernels.
    """

    def __init__(self, options: ServeOptions, *, open_browser: bool = True, log: Callable[[str], None] = print) -> None:
        self.options = options
        self.open_browser = open_browser
        self.log = log
        self.url = f"http://{_url_host(options.host)}:{options.port}/"
        self._scratch = tempfile.TemporaryDirectory(prefix="scorecam-explorer-")
        self.status_path = Path(self._scratch.name) / "status.json"
        self.process: subprocess.Popen | None = None
        self._serving = threading.Event()
        self._watcher: threading.Thread | None = None
        self._expected: dict[str, str] = {}

    def start(self, startup_timeout: float = 90.0) -> AppServer:
        """Start Voila (returns at once; the URL is printed when it answers)."""
        require_voila()
        write_status(self.status_path, AppStatus("starting"))
        env = app_environment(self.status_path, jupyter_dir=write_kernel_spec(Path(self._scratch.name)))
        self.process = subprocess.Popen(
            voila_command(notebook_path(), self.options.port, self.options.host, self.options),
            env=env,
            preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        self._watcher = threading.Thread(target=self._announce, args=(startup_timeout,), daemon=True)
        self._watcher.start()
        return self

    def _announce(self, timeout: float) -> None:
        assert self.process is not None
        if not wait_until_serving(static_url(self.options.port, self.options.host), self.process, timeout):
            return
        self._serving.set()
        if not self.options.is_local:
            from scorecam_explorer.serving.options import exposure_notice

            self.log(exposure_notice(self.options))
        self.log(f"Score-CAM explorer: {self.url}  (Ctrl-C to stop)")
        if self.open_browser:
            webbrowser.open(self.url)

    def expect(self, candidate: Path | None, *, model_name: str | None = None, weights: str | None = "DEFAULT") -> None:
        """Name the cache the command expects to serve, which pages may open in advance (they
        show it only if :meth:`ready` names the same cache, unchanged)."""
        if candidate is None:
            self._expected = {}
            return
        self._expected = {
            "candidate": str(Path(candidate).expanduser().resolve()),
            "model": model_name or "",
            "weights": "none" if weights is None else str(weights),
        }

    def report(self, status: AppStatus) -> None:
        """Tell the pages what the command is doing."""
        if status.state not in ("ready", "failed") and self._expected:
            from dataclasses import replace

            status = replace(status, **self._expected)
        write_status(self.status_path, status)

    def ready(self, prepared: PreparedCache, *, model_name: str | None, weights: str | None) -> None:
        """Tell the pages to open ``prepared``'s cache (and which model they may load).

        The cache, loaded and checked once here, is also pickled into this server's private
        folder as a snapshot that every page reads instead of the Zarr store. A dataset store
        (``prepared.status == "dataset"``) is not: every page opens it lazily.
        """
        # a dataset store is opened lazily by each page, never copied whole
        snapshot = None if prepared.status == "dataset" else self._write_snapshot(prepared)
        self.report(
            AppStatus(
                "ready",
                cache=str(Path(prepared.path).resolve()),
                model=model_name or "",
                weights="none" if weights is None else str(weights),
                layers=list(prepared.layers),
                snapshot=str(snapshot) if snapshot else "",
            )
        )

    def _write_snapshot(self, prepared: PreparedCache) -> Path | None:
        import pickle

        tree = prepared.tree if prepared.tree is not None else open_existing(Path(prepared.path))
        target = Path(self._scratch.name) / "cache.pickle"
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            with open(temporary, "wb") as stream:
                pickle.dump(tree, stream, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, target)
        except (OSError, pickle.PicklingError, TypeError, AttributeError):
            temporary.unlink(missing_ok=True)
            return None  # the pages open the Zarr store instead
        return target

    def fail(self, message: str) -> None:
        """Show ``message`` on every page instead of the explorer."""
        self.report(AppStatus("failed", message))

    def wait(self) -> int:
        """Serve until Ctrl-C (0) or until Voila stops (its status)."""
        assert self.process is not None and self._watcher is not None
        try:
            self._watcher.join()
            if not self._serving.is_set():
                if self.process.poll() is None:
                    _stop(self.process)
                raise ScorecamError(
                    f"Voila did not start on port {self.options.port} (exit status {self.process.returncode}); see its log above."
                )
            return self.process.wait()
        except KeyboardInterrupt:
            self.log("stopping ...")
            return 0

    def stop(self) -> None:
        """Stop Voila (and so its kernels) and remove the status file."""
        if self.process is not None:
            _stop(self.process)
        self._scratch.cleanup()


@contextlib.contextmanager
def app_server(options: ServeOptions, *, open_browser: bool = True, log: Callable[[str], None] = print) -> Iterator[AppServer]:
    """A started :class:`AppServer`, stopped on leaving (SIGTERM counts as Ctrl-C meanwhile)."""
    server = AppServer(options, open_browser=open_browser, log=log)
    with _terminate_as_interrupt():
        try:
            yield server.start()
        finally:
            server.stop()


def serve(
    cache_path: Path,
    *,
    port: int,
    model_name: str | None,
    weights: str | None,
    open_browser: bool = True,
    log: Callable[[str], None] = print,
    options: ServeOptions | None = None,
) -> int:
    """Serve a cache that is ready until Ctrl-C (or until Voila stops); returns its status."""
    from dataclasses import replace

    chosen = replace(options or ServeOptions(), port=int(port))
    check_port(chosen.port, chosen.host)
    with app_server(chosen, open_browser=open_browser, log=log) as server:
        server.ready(PreparedCache(Path(cache_path), "opened", []), model_name=model_name, weights=weights)
        return server.wait()


def _stop_with_parent() -> None:
    """In the Voila child on Linux: get SIGTERM when the command exits, however it exits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while serving, so that Voila is stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- inside the app's kernel ------------------------------------------------------------


def explorer_from_environment(environ: Mapping[str, str] | None = None) -> Explorer:
    """The explorer for the cache named by ``SCORECAM_EXPLORER_APP_CACHE``.

    ``SCORECAM_EXPLORER_APP_MODEL`` (and ``..._WEIGHTS``) name a model loaded only if the
    page asks for it (to add a layer or run Grad-CAM); empty means the model named in the
    cache, if ``load_model`` knows it.
    """
    env = os.environ if environ is None else environ
    path = env.get(ENV_APP_CACHE)
    if not path:
        raise ScorecamError(f"{ENV_APP_CACHE} is not set: start the app with `scorecam-explorer app`.")
    return explorer_for_cache(Path(path), model_name=env.get(ENV_APP_MODEL, ""), weights=env.get(ENV_APP_WEIGHTS, "DEFAULT"))


def explorer_for_cache(path: Path, *, model_name: str = "", weights: str = "DEFAULT") -> Explorer:
    """The explorer of the cache at ``path``; no torch until the page asks for the model.

    ``model_name`` empty means the model named in the cache; ``weights`` ``"none"`` means
    random weights.
    """
    from scorecam_explorer.serving.page import ModelSpec, build_explorer

    return build_explorer(str(path), ModelSpec(model_name, weights))
