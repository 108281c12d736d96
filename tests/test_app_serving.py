"""Serving the app to a class: options and the Voila command they make, the session count and
the "class is full" page, the status file and the page that follows it, progress while
computing, and the messages of a damaged or deleted cache."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import pytest
from _tiny_models import tiny_model, write_images

from scorecam_explorer import cli, webapp
from scorecam_explorer.cache import save_cache
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import CacheError
from scorecam_explorer.serving import page as app_page_module
from scorecam_explorer.serving.options import ServeOptions, exposure_notice, voila_command
from scorecam_explorer.serving.sessions import SessionRegistry, full_page
from scorecam_explorer.serving.status import AppStatus, read_status, write_status


@pytest.fixture
def pictures(tmp_path) -> list[str]:
    return [str(path) for path in write_images(tmp_path / "pictures", 1)]


@pytest.fixture
def tiny_cache(tmp_path, pictures) -> Path:
    return Path(save_cache(compute_cache(tiny_model(), pictures[0], ["features.4"], progress=False), tmp_path / "c.zarr"))


# ---- options and the Voila command ----------------------------------------------------------


def test_defaults_bind_localhost_cull_closed_pages_and_limit_sessions(tmp_path) -> None:
    options = ServeOptions(port=9000)
    assert options.host == "127.0.0.1" and options.is_local
    command = voila_command(tmp_path / "app.ipynb", options)
    assert "--Voila.ip=127.0.0.1" in command and "--port=9000" in command
    assert "--MappingKernelManager.cull_idle_timeout=120" in command
    assert "--MappingKernelManager.cull_connected=False" in command  # an open page's kernel is never culled
    assert "--AppVoila.max_sessions=30" in command
    assert "--preheat_kernel=True" in command and "--pool_size=1" in command
    assert "--KernelManager.transport=ipc" in command  # no TCP ports for kernels, no "without encryption" warning


def test_culling_pool_and_limit_can_be_switched_off(tmp_path) -> None:
    command = voila_command(tmp_path / "app.ipynb", ServeOptions(cull_after=0, pool=0, max_sessions=0))
    assert not any(part.startswith("--MappingKernelManager.cull") for part in command)
    assert not any(part.startswith("--preheat") for part in command)
    assert "--AppVoila.max_sessions=0" in command
    short = voila_command(tmp_path / "app.ipynb", ServeOptions(cull_after=3))
    assert "--MappingKernelManager.cull_idle_timeout=3" in short and "--MappingKernelManager.cull_interval=1" in short


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_sessions": -1}, "--max-sessions"),
        ({"cull_after": -5}, "--cull-after"),
        ({"pool": -1}, "--pool"),
        ({"pool": 5, "max_sessions": 2}, r"--pool \(5\) cannot exceed --max-sessions \(2\)"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        ServeOptions(**options)


def test_a_network_host_says_what_it_exposes() -> None:
    options = ServeOptions(host="0.0.0.0", port=8866, max_sessions=25)
    assert not options.is_local and ServeOptions(host="::1").is_local and ServeOptions(host="localhost").is_local
    notice = exposure_notice(options)
    assert "0.0.0.0:8866" in notice and "no password" in notice and "25 pages" in notice and "no code" in notice


class FakeServer:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.statuses: list = []

    def expect(self, *args, **kwargs) -> None:
        pass

    def report(self, status) -> None:
        self.statuses.append(status)

    def ready(self, prepared, **kwargs) -> None:
        self.statuses.append(AppStatus("ready", cache=str(prepared.path)))

    def fail(self, message) -> None:
        self.statuses.append(AppStatus("failed", message))

    def wait(self) -> int:
        return 0


@pytest.fixture
def fake_server(monkeypatch) -> list[FakeServer]:
    made: list[FakeServer] = []

    def app_server(options, **kwargs):
        made.append(FakeServer(options))
        return contextlib.nullcontext(made[-1])

    monkeypatch.setattr(webapp, "app_server", app_server)
    return made


def test_cli_passes_host_and_class_options(tiny_cache, fake_server) -> None:
    port = webapp.free_port()
    status = cli.main(
        ["app", "--cache", str(tiny_cache), "--no-browser", "--port", str(port), "--host", "0.0.0.0",
         "--max-sessions", "12", "--cull-after", "45", "--pool", "3"]
    )
    assert status == 0
    options = fake_server[0].options
    assert (options.host, options.port, options.max_sessions, options.cull_after, options.pool) == ("0.0.0.0", port, 12, 45.0, 3)
    assert fake_server[0].statuses[-1].state == "ready"


def test_cli_refuses_bad_class_options_before_computing(capsys) -> None:
    assert cli.main(["app", "--no-browser", "--port", str(webapp.free_port()), "--pool", "9", "--max-sessions", "3"]) == 2
    assert "--pool (9) cannot exceed --max-sessions (3)" in capsys.readouterr().err


# ---- sessions and the "class is full" page ----------------------------------------------------


class FakeKernels:
    def __init__(self) -> None:
        self.alive: list[str] = []
        self._kernel_connections: dict[str, int] = {}

    def list_kernel_ids(self) -> list[str]:
        return list(self.alive)

    async def start_kernel(self, **kwargs) -> str:
        kernel_id = f"k{len(self.alive)}"
        self.alive.append(kernel_id)
        self._kernel_connections[kernel_id] = 0
        return kernel_id

    async def get_rendered_notebook(self, **kwargs):
        return None, [], await self.start_kernel()


def test_sessions_count_connected_and_loading_pages_not_closed_ones() -> None:
    now = [0.0]
    kernels = FakeKernels()
    registry = SessionRegistry(kernels, max_sessions=2, grace=10.0, clock=lambda: now[0])
    registry.watch()

    async def visit(pooled: bool) -> str:
        token = registry.begin_request()
        try:
            if pooled:
                return (await kernels.get_rendered_notebook())[2]
            return await kernels.start_kernel()
        finally:
            registry.end_request(token)

    asyncio.run(kernels.start_kernel())  # a pool kernel, not handed to any page: not a session
    assert registry.active() == 0
    first = asyncio.run(visit(pooled=True))
    assert registry.active() == 1 and not registry.full()  # loading: counted
    second = asyncio.run(visit(pooled=False))
    assert registry.active() == 2 and registry.full()
    kernels._kernel_connections[first] = 1  # connected
    now[0] = 11.0
    assert registry.active() == 1  # the second page never connected within the grace
    registry.active()
    kernels._kernel_connections[first] = 0  # its page closed: no longer a session, even before culling
    assert registry.active() == 0 and not registry.full()
    kernels.alive.remove(second)  # culled
    assert registry.active() == 0 and second not in registry.claims


def test_a_request_being_answered_counts_until_it_has_a_kernel() -> None:
    kernels = FakeKernels()
    registry = SessionRegistry(kernels, max_sessions=1)
    token = registry.begin_request()
    assert registry.full()
    registry.end_request(token)
    assert not registry.full()
    assert not SessionRegistry(kernels, max_sessions=0).full()  # no limit


def test_the_class_full_page_says_so_and_retries() -> None:
    html = full_page(30)
    assert 'id="class-full"' in html and "The class is full" in html and "All 30 places" in html
    assert 'http-equiv="refresh"' in html and "--max-sessions" in html


# ---- status, progress and the page -------------------------------------------------------------


def test_status_file_round_trip_and_description(tmp_path) -> None:
    path = tmp_path / "status.json"
    assert read_status(path) is None
    status = AppStatus("computing", "head (10 of 40 channels in all)", 1, 4)
    write_status(path, status)
    assert read_status(path) == status and status.fraction == 0.25
    assert status.describe() == "Computing layer 2 of 4: head (10 of 40 channels in all)"
    path.write_text("{ half")
    assert read_status(path) is None  # never half a status: None, and the page keeps the last one
    with pytest.raises(ValueError, match="unknown app state"):
        AppStatus("sleeping")


def test_computing_reports_layer_k_of_n(tmp_path, pictures, monkeypatch) -> None:
    monkeypatch.setattr("scorecam_explorer.models.load_model", lambda name="tiny", weights=None, device=None: tiny_model())
    statuses: list[AppStatus] = []
    webapp.prepare_cache(
        model_name="tiny", image=pictures[0], layers=["features.1", "features.4"], cache_path=tmp_path / "p.zarr",
        progress=False, log=lambda message: None, report=statuses.append,
    )
    computing = [status for status in statuses if status.state == "computing"]
    assert {(status.step, status.steps) for status in computing} >= {(0, 2), (1, 2)}
    assert any("features.4" in status.message for status in computing)
    assert statuses[0].state == "loading"


def test_a_damaged_cache_given_alone_says_what_recompute_would_compute(tiny_cache) -> None:
    (tiny_cache / "zarr.json").write_text("{ not json")
    with pytest.raises(CacheError) as refused:
        webapp.prepare_cache(model_name=None, cache_path=tiny_cache, progress=False, log=lambda message: None)
    message = str(refused.value)
    assert "not a readable cache" in message
    assert "--recompute and the --model, --weights, --image and --layer this cache was made with" in message
    assert "--recompute alone computes efficientnet_lite0 on sample:chelsea there instead" in message


def follow(tmp_path: Path, *statuses: AppStatus) -> app_page_module.AppPage:
    """A page following a status file that holds ``statuses`` one after another."""
    path = tmp_path / "status.json"
    page = app_page_module.AppPage()

    async def run() -> None:
        task = asyncio.ensure_future(page.follow(path, poll_seconds=0.01))
        for status in statuses:
            write_status(path, status)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    return page


def test_the_page_shows_progress_then_the_explorer(tmp_path, tiny_cache) -> None:
    shown: list[str] = []
    page = app_page_module.AppPage()
    original = page.show_status
    page.show_status = lambda status: (shown.append(status.describe()), original(status))  # type: ignore[method-assign]
    path = tmp_path / "status.json"

    async def run() -> None:
        task = asyncio.ensure_future(page.follow(path, poll_seconds=0.01))
        for status in (AppStatus("loading", "Loading the model"), AppStatus("computing", "head", 0, 2),
                       AppStatus("ready", cache=str(tiny_cache))):
            write_status(path, status)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert shown[:2] == ["Loading the model", "Computing layer 1 of 2: head"]
    assert page.explorer is not None and page.widget.children == (page.explorer.widget,)


def test_the_page_says_why_when_the_command_failed(tmp_path) -> None:
    page = follow(tmp_path, AppStatus("failed", "the cache at x cannot be used: it is damaged"))
    assert "could not start" in page.message.value and "it is damaged" in page.message.value
    assert page.widget.children == (page.message,) and "Traceback" not in page.message.value


def test_a_cache_deleted_under_the_app_gives_a_message_not_a_traceback(tmp_path, tiny_cache) -> None:
    shutil.rmtree(tiny_cache)
    page = follow(tmp_path, AppStatus("ready", cache=str(tiny_cache)))
    assert "cannot be opened" in page.message.value and "start it again" in page.message.value
    assert page.explorer is None and "Traceback" not in page.message.value


def test_pages_use_the_commands_snapshot_even_if_the_cache_is_deleted(tmp_path, tiny_cache) -> None:
    server = webapp.AppServer(ServeOptions(), open_browser=False)
    try:
        snapshot = server._write_snapshot(webapp.PreparedCache(tiny_cache, "opened", ["features.4"]))
        assert snapshot is not None and snapshot.is_file()
        shutil.rmtree(tiny_cache)
        page = follow(tmp_path, AppStatus("ready", cache=str(tiny_cache), snapshot=str(snapshot)))
        assert page.explorer is not None and page.explorer.state.layers == ["features.4"]
    finally:
        server.stop()


def test_a_cache_opened_in_advance_is_shown_only_if_unchanged(tmp_path, tiny_cache, pictures) -> None:
    page = follow(tmp_path, AppStatus("loading", candidate=str(tiny_cache)), AppStatus("ready", cache=str(tiny_cache)))
    early = page.explorer
    assert early is not None
    # the command rewrote the cache after the page opened it: opened again
    page = app_page_module.AppPage()
    path = tmp_path / "status2.json"

    async def run() -> None:
        task = asyncio.ensure_future(page.follow(path, poll_seconds=0.01))
        write_status(path, AppStatus("loading", candidate=str(tiny_cache)))
        await asyncio.sleep(0.3)
        assert page._early is not None and page._early.explorer is not None
        opened_early = page._early.explorer
        save_cache(compute_cache(tiny_model(), pictures[0], ["features.1"], progress=False), tiny_cache, overwrite=True)
        write_status(path, AppStatus("ready", cache=str(tiny_cache)))
        await asyncio.wait_for(task, 30)
        assert page.explorer is not opened_early

    asyncio.run(run())
    assert page.explorer.state.layers == ["features.1"]


def test_recent_caches_are_remembered_per_options(tmp_path) -> None:
    key = webapp.recent_key(model=None, image="sample:coffee")
    assert webapp.recall_cache(key, tmp_path) is None
    (tmp_path / "a.zarr").mkdir()
    webapp.remember_cache(key, tmp_path / "a.zarr", tmp_path)
    assert webapp.recall_cache(key, tmp_path) == (tmp_path / "a.zarr").resolve()
    assert webapp.recall_cache(webapp.recent_key(model=None, image="sample:chelsea"), tmp_path) is None
    shutil.rmtree(tmp_path / "a.zarr")
    assert webapp.recall_cache(key, tmp_path) is None  # a hint only: gone means none


def test_the_kernel_of_a_page_still_loading_is_not_culled() -> None:
    now = [0.0]
    kernels = FakeKernels()
    culled: list[str] = []

    async def cull_kernel_if_idle(kernel_id: str) -> None:
        culled.append(kernel_id)

    kernels.cull_kernel_if_idle = cull_kernel_if_idle
    registry = SessionRegistry(kernels, max_sessions=5, grace=100.0, clock=lambda: now[0])
    registry.watch()
    registry.protect_loading_pages()
    token = registry.begin_request()
    loading = asyncio.run(kernels.start_kernel())
    registry.end_request(token)
    asyncio.run(kernels.cull_kernel_if_idle(loading))
    assert culled == []  # handed out, not connected yet, within the grace
    kernels._kernel_connections[loading] = 1
    asyncio.run(kernels.cull_kernel_if_idle(loading))  # connected: the culler decides (it skips connected ones)
    kernels._kernel_connections[loading] = 0  # closed
    asyncio.run(kernels.cull_kernel_if_idle(loading))
    assert culled == [loading, loading]
    now[0] = 200.0
    asyncio.run(kernels.cull_kernel_if_idle("never-claimed"))
    assert culled[-1] == "never-claimed"


def test_the_cache_served_last_time_is_shown_while_the_command_checks(tmp_path, tiny_cache) -> None:
    page = app_page_module.AppPage()
    path = tmp_path / "status.json"

    async def run() -> None:
        task = asyncio.ensure_future(page.follow(path, poll_seconds=0.01))
        write_status(path, AppStatus("loading", "Loading the model", candidate=str(tiny_cache)))
        for _ in range(300):
            if len(page.widget.children) == 3:
                break
            await asyncio.sleep(0.01)
        preview = page.widget.children[2]
        assert "served last time" in page.message.value
        write_status(path, AppStatus("failed", "the cache at x cannot be used: other weights"))
        await asyncio.wait_for(task, 30)
        assert preview not in page.widget.children  # the check failed: the preview goes, the reason shows

    asyncio.run(run())
    assert "other weights" in page.message.value and page.explorer is None


def test_pages_arriving_together_do_not_queue_behind_the_pool() -> None:
    from scorecam_explorer.serving.voila_main import use_only_ready_pool_kernels

    async def run() -> None:
        loop = asyncio.get_running_loop()
        starting, ready = loop.create_future(), loop.create_future()
        ready.set_result({"kernel_id": "ready"})
        handed: list = []

        class Pools:
            _pools = {"app.ipynb": [starting, ready]}

            async def get_rendered_notebook(self, notebook_name, **kwargs):
                task = self._pools[notebook_name].pop(0)
                handed.append(await task)
                return None, [], handed[-1]["kernel_id"]

            def get_pool_size(self, notebook_name):
                return len(self._pools[notebook_name])

        manager = Pools()
        use_only_ready_pool_kernels(manager)
        assert manager.get_pool_size("app.ipynb") == 1  # the kernel still starting does not count
        assert (await manager.get_rendered_notebook(notebook_name="app.ipynb"))[2] == "ready"
        assert manager.get_pool_size("app.ipynb") == 0  # so Voila starts a kernel for the next page
        starting.cancel()

    asyncio.run(run())
