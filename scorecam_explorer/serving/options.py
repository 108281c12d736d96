"""How the app is served: address, session limit, culling of closed pages' kernels, the pool
of pre-started kernels; and the Voila command line that says so."""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

LOCALHOST = "127.0.0.1"
DEFAULT_MAX_SESSIONS = 30
DEFAULT_CULL_AFTER = 120.0
DEFAULT_POOL = 1
POOL_REFILL_DELAY = 5.0
"""Seconds before a kernel taken from the pool is replaced: the first page's explorer gets the
CPU first."""

# front-end extensions installed beside Voila (JupyterLab, Notebook 7) that the app page does not use
VOILA_EXTENSION_DENYLIST = ("@voila-dashboards/jupyterlab-preview", "@jupyter-notebook/lab-extension")


@dataclass(frozen=True)
class ServeOptions:
    """Serving options (see ``scorecam-explorer app --help``).

    ``host``: the address to listen on (127.0.0.1: this machine only). ``max_sessions``:
    pages served at once before a visitor gets "the class is full" (0: no limit).
    ``cull_after``: seconds after which the kernel of a page that is no longer connected
    (closed, reloaded) and idle is shut down (0: never). ``pool``: kernels started and
    rendered in advance, so that a page gets an explorer at once (0: start one per page).
    ``session_grace``: seconds a page that got a kernel counts while it is still loading (and
    its kernel is not culled: on a busy machine a page can take longer than ``cull_after``
    to connect).
    """

    host: str = LOCALHOST
    port: int = 8866
    max_sessions: int = DEFAULT_MAX_SESSIONS
    cull_after: float = DEFAULT_CULL_AFTER
    pool: int = DEFAULT_POOL
    session_grace: float = 120.0

    def __post_init__(self) -> None:
        if self.max_sessions < 0:
            raise ValueError(f"--max-sessions must be 0 (no limit) or more, not {self.max_sessions}")
        if self.cull_after < 0:
            raise ValueError(f"--cull-after must be 0 (never) or more seconds, not {self.cull_after:g}")
        if self.pool < 0:
            raise ValueError(f"--pool must be 0 or more kernels, not {self.pool}")
        if self.max_sessions and self.pool > self.max_sessions:
            raise ValueError(f"--pool ({self.pool}) cannot exceed --max-sessions ({self.max_sessions})")

    @property
    def cull_interval(self) -> int:
        """How often the culler looks (seconds): a quarter of ``cull_after``, 1 to 30."""
        return int(min(30, max(1, self.cull_after // 4)))

    @property
    def is_local(self) -> bool:
        """True when only this machine can connect."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def voila_command(notebook: Path, options: ServeOptions) -> list[str]:
    """The command line that serves ``notebook`` with :mod:`.voila_main` as ``options`` say."""
    command = [
        sys.executable,
        "-m",
        "scorecam_explorer.serving.voila_main",
        str(notebook),
        f"--port={int(options.port)}",
        f"--Voila.ip={options.host}",
        "--Voila.port_retries=0",
        "--no-browser",
        "--theme=light",
        *(f"--VoilaConfiguration.extension_denylist={name}" for name in VOILA_EXTENSION_DENYLIST),
        "--VoilaConfiguration.show_tracebacks=False",
        # kernels talk to the server over Unix sockets in Voila's private directory, not TCP ports
        "--KernelManager.transport=ipc",
        f"--AppVoila.max_sessions={int(options.max_sessions)}",
        f"--AppVoila.session_grace={float(options.session_grace):g}",
    ]
    if options.cull_after > 0:
        command += [
            f"--MappingKernelManager.cull_idle_timeout={max(1, round(options.cull_after))}",
            f"--MappingKernelManager.cull_interval={options.cull_interval}",
            "--MappingKernelManager.cull_connected=False",
        ]
    if options.pool > 0:
        command += [
            "--preheat_kernel=True",
            f"--pool_size={int(options.pool)}",
            f"--VoilaKernelManager.fill_delay={POOL_REFILL_DELAY:g}",
        ]
    return command


def exposure_notice(options: ServeOptions) -> str:
    """What listening on a non-local address exposes, for the command to print."""
    import socket

    where = f"http://{socket.gethostname()}:{options.port}/" if options.host in ("0.0.0.0", "::", "") else (
        f"http://{options.host}:{options.port}/"
    )
    return (
        f"serving on {options.host}:{options.port} (students open {where} or this machine's address): anyone who can reach this machine on that network can open "
        "the explorer, with no password. A page can only view this cache, move the controls and, if the "
        "model is available, add layers or run Grad-CAM (each page's kernel accepts widget messages only, "
        f"no code); up to {options.max_sessions or 'unlimited'} pages at once. Serve only on a network you trust."
    )
