"""bfloat16 only where the hardware computes in it: refused quickly, with what was found, elsewhere."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from _tiny_models import TinyCNN, tiny_model, write_images

from scorecam_explorer import device
from scorecam_explorer.cli import main
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.errors import ScorecamError

NOT_NATIVE = "CPU capability AVX2: no AVX512-BF16, no AMX"  # what the no_native_bfloat16 fixture reports
# Refusing takes no forward pass; the bound only leaves room for a loaded shared machine.
QUICK_S = 5.0


def counted(model: torch.nn.Module) -> list[int]:
    """A counter of the model's forward calls (its top module's)."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture
def fresh_cpu_probe():
    """The CPU probe is made once per process: forget it before and after a test that fakes the CPU."""
    device._cpu_bfloat16_support.cache_clear()
    yield
    device._cpu_bfloat16_support.cache_clear()


# ---- the probe ---------------------------------------------------------------------------


def test_the_probe_on_this_machine_gives_a_well_formed_record() -> None:
    support = device.bfloat16_support("cpu")
    assert isinstance(support, device.BFloat16Support)
    assert support.device == "cpu" and isinstance(support.native, bool)
    assert support.hardware.strip() and support.found.strip()
    assert support.describe() == f"{support.hardware} ({support.found})"
    assert device.bfloat16_support("cpu") == support  # asked again: the same answer
    lines = device.machine_description("cpu")
    assert lines[0].startswith(f"CPU: {device.cpu_model_name()}") and device.cpu_capability() in lines[0]
    assert lines[1].startswith(f"native bfloat16 on the CPU: {'yes' if support.native else 'no'}")
    if support.native:
        assert device.check_native_precision("bfloat16", "cpu") == "bfloat16"
    else:
        with pytest.raises(ScorecamError, match="float32, which is faster here"):
            device.check_native_precision("bfloat16", "cpu")


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "native", "found"),
    [
        ("AVX2", False, False, False, "CPU capability AVX2: no AVX512-BF16, no AMX"),
        ("AVX512", True, False, True, "CPU capability AVX512: AVX512-BF16, no AMX"),
        ("AVX512", False, True, True, "CPU capability AVX512: no AVX512-BF16, AMX"),
        # the instructions are there, but torch's kernels were capped below them
        ("AVX2", True, False, False, "CPU capability AVX2: AVX512-BF16, no AMX, but torch's kernels are capped"),
    ],
)
def test_an_x86_cpu_is_native_with_avx512_bf16_or_amx(
    monkeypatch, fresh_cpu_probe, capability, avx512_bf16, amx, native, found
):
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(variable, raising=False)
    support = device.bfloat16_support("cpu")
    assert support.native == native and support.found.startswith(found)


@pytest.mark.parametrize(
    ("variable", "value", "native"),
    [("ONEDNN_MAX_CPU_ISA", "AVX2", False), ("DNNL_MAX_CPU_ISA", "avx512_core", False),
     ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True), ("ONEDNN_MAX_CPU_ISA", "ALL", True)],
)
def test_onednn_capped_below_bfloat16_is_not_native(monkeypatch, fresh_cpu_probe, variable, value, native):
    """oneDNN capped below AVX512-BF16 emulates bfloat16 on a CPU that has it (22x slower)."""
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    for other in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(variable, value)
    support = device.bfloat16_support("cpu")
    assert support.native == native
    if not native:
        assert f"oneDNN is capped at {value.upper()} ({variable})" in support.found


def test_a_cpu_torch_cannot_check_is_not_native_and_says_so(monkeypatch, fresh_cpu_probe) -> None:
    monkeypatch.setattr(device.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SVE256")
    support = device.bfloat16_support("cpu")
    assert not support.native
    assert "aarch64 CPU, CPU capability SVE256" in support.found and "treated as not native" in support.found


@pytest.mark.parametrize(("capability", "native"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_a_cuda_card_is_native_from_compute_capability_8_0(monkeypatch, capability, native) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    support = device.bfloat16_support(torch.device("cuda", 0))  # a torch.device is taken as it is
    assert (support.device, support.hardware, support.native) == ("cuda:0", "Test GPU", native)
    assert f"compute capability {capability[0]}.{capability[1]}" in support.found


# ---- compute_cache ------------------------------------------------------------------------


def test_compute_cache_refuses_bfloat16_before_any_forward_pass(no_native_bfloat16) -> None:
    model = TinyCNN().eval()
    calls = counted(model)
    started = time.perf_counter()
    with pytest.raises(ScorecamError) as refusal:
        compute_cache(model, torch.rand(1, 3, 32, 32), "features.4", progress=False, precision="bfloat16")
    assert time.perf_counter() - started < QUICK_S
    assert calls[0] == 0
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith("precision 'bfloat16' refused on cpu: test CPU (CPU capability AVX2: no AVX512-BF16")
    assert "float32, which is faster here" in message and "AVX512-BF16 or AMX" in message


def test_compute_cache_runs_bfloat16_where_it_is_native(native_bfloat16) -> None:
    model = TinyCNN().eval()
    cache = compute_cache(model, torch.rand(1, 3, 32, 32), "features.4", progress=False, precision="bfloat16")
    assert cache.attrs["dtype"] == "bfloat16"


def test_float32_never_asks_about_bfloat16(monkeypatch) -> None:
    def asked(_device="auto"):
        raise AssertionError("float32 must not depend on bfloat16 support")

    monkeypatch.setattr(device, "bfloat16_support", asked)
    cache = compute_cache(TinyCNN().eval(), torch.rand(1, 3, 32, 32), "features.4", progress=False)
    assert cache.attrs["dtype"] == "float32"


@pytest.mark.parametrize("precision", ["float16", "fp32", "half"])
def test_an_unknown_precision_lists_the_ones_that_exist(precision) -> None:
    listed = f"unknown precision '{precision}'; choose one of {', '.join(device.PRECISIONS)}."
    with pytest.raises(ScorecamError) as refusal:
        compute_cache(TinyCNN().eval(), torch.rand(1, 3, 32, 32), "features.4", progress=False, precision=precision)
    assert str(refusal.value) == listed
    with pytest.raises(ScorecamError, match="choose one of float32, bfloat16"):
        device.check_native_precision(precision)


# ---- the command line ---------------------------------------------------------------------


def test_cli_compute_refuses_bfloat16_in_one_line_before_the_model_loads(
    tmp_path, capsys, monkeypatch, no_native_bfloat16
) -> None:
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("scorecam_explorer.models.load_model", no_model)
    started = time.perf_counter()
    status = main(
        ["compute", "--model", "mobilenet_v3_small", "--weights", "none", "--image", "sample:rocket",
         "--precision", "bfloat16", "--no-progress", "--out", str(tmp_path / "c.zarr")]
    )
    assert time.perf_counter() - started < QUICK_S
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scorecam-explorer: error: precision 'bfloat16' refused on ")
    assert NOT_NATIVE in lines[0] and "float32, which is faster here" in lines[0]
    assert not (tmp_path / "c.zarr").exists()


def test_cli_compute_dataset_refuses_bfloat16_before_a_cluster_starts(
    tmp_path, capsys, monkeypatch, no_native_bfloat16
) -> None:
    from scorecam_explorer import distributed

    def no_cluster(*_args, **_kwargs):
        raise AssertionError("no cluster may start")

    monkeypatch.setattr(distributed, "_connect", no_cluster)
    folder = tmp_path / "pictures"
    folder.mkdir()
    write_images(folder, 2)
    status = main(
        ["compute-dataset", "--model", "mobilenet_v3_small", "--weights", "none", "--images", str(folder),
         "--precision", "bfloat16", "--no-progress", "--out", str(tmp_path / "store.zarr")]
    )
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and NOT_NATIVE in lines[0] and "float32, which is faster here" in lines[0]
    assert not (tmp_path / "store.zarr").exists()


# ---- the Dask dataset path and the explorer ----------------------------------------------


def test_compute_dataset_refuses_bfloat16_at_the_client_before_a_local_cluster(
    tmp_path, monkeypatch, no_native_bfloat16
) -> None:
    from scorecam_explorer import distributed

    monkeypatch.setattr(distributed, "_connect", lambda *_args: pytest.fail("no cluster may start"))
    folder = tmp_path / "pictures"
    folder.mkdir()
    write_images(folder, 2)
    with pytest.raises(ScorecamError, match="precision 'bfloat16' refused"):
        distributed.compute_dataset(tiny_model, folder, "features.4", tmp_path / "store.zarr", precision="bfloat16")
    assert not (tmp_path / "store.zarr").exists()


def test_a_workers_first_task_refuses_bfloat16_before_building_the_model(no_native_bfloat16) -> None:
    """With a running scheduler, the check runs on a worker in the task that describes the model,
    before any image is scheduled."""
    from scorecam_explorer import distributed

    built = []

    def factory():
        built.append(True)
        return tiny_model()

    with pytest.raises(ScorecamError, match="precision 'bfloat16' refused"):
        distributed._describe_model(factory, "key", None, "cpu", True, "bfloat16")
    assert built == []
    assert distributed._describe_model(functools.partial(tiny_model), "key-2", None, "cpu", False)["layers"]


def test_adding_a_layer_to_a_bfloat16_cache_is_refused_in_place(tmp_path, monkeypatch) -> None:
    from conftest import _patched_bfloat16_support

    from scorecam_explorer.explorer import Explorer
    from scorecam_explorer.explorer.model_link import compute_layers

    model = tiny_model()
    pictures = [str(path) for path in write_images(tmp_path, 1)]
    _patched_bfloat16_support(monkeypatch, True, "native")
    cache = compute_cache(model, pictures, ["features.4"], progress=False, batch_size=8, precision="bfloat16")
    _patched_bfloat16_support(monkeypatch, False, NOT_NATIVE)
    calls = counted(model.module)
    with pytest.raises(ScorecamError, match="recompute the cache in float32 here") as refusal:
        compute_layers(cache, model, ["features.1"], progress=False)
    assert NOT_NATIVE in str(refusal.value) and calls[0] == 0
    explorer = Explorer(cache, model=model)
    explorer.controls.compute_layer("features.1")
    message = explorer.controls.message.value
    assert "Could not compute features.1" in message and "no AVX512-BF16, no AMX" in message
    assert "float32, which is faster here" in message
    assert calls[0] == 0 and not explorer.controls.compute.disabled
