"""Score-CAM speed, side by side: scorecam_explorer against pytorch-grad-cam and torchcam.

Run:  python benchmarks/bench_scorecam.py            (full: several minutes on 2 CPU cores)
      python benchmarks/bench_scorecam.py --quick    (small inputs, one round: a smoke test)

What it measures (same model, picture and layer for every implementation; timings of the
in-process implementations are interleaved round by round and the median is reported,
because a shared machine's speed drifts):

1. EfficientNet-Lite0 (the default model), its head activation (1280 channels), a cat photo:
   - ours, exact (float32, every channel accounted for), ``pytorch-grad-cam`` convention:
     the first call in the process (it folds the model's BatchNorms once and measures the
     batch plan) and later calls (median);
   - pytorch-grad-cam ``ScoreCAM`` as its users run it (its defaults, in a fresh process,
     default allocator), and in this process (same allocator settings as ours);
   - torchcam ``ScoreCAM`` in this process;
   - ours with ``precision="bfloat16"``, with a faithfulness report against float32, only
     where the CPU computes in bfloat16 natively (AVX512-BF16 or AMX); elsewhere these rows
     are skipped with the reason printed (emulated bfloat16 takes minutes, and compute_cache
     refuses it).
   Agreement: Pearson r between our recomposed map and pytorch-grad-cam's map.
2. ResNet-18 ``layer4`` (512 channels, random weights), ours against pytorch-grad-cam in
   this process, every round printed; and pytorch-grad-cam against our floor (measured after
   each of our runs), the most that cutting everything but the passes themselves could give.
3. Maps for 10 classes: one ``compute_cache`` (first call) plus 10 recompositions, against
   pytorch-grad-cam paying every pass again per class (10 x its measured single run).
4. Recomposing a map from the cache (new class / preset / channel subset): median latency.
5. The floor: (forwarded channels + 2) x one forward per image at the best batch size, in
   the same configuration (BatchNorm folded, convolutions fused with their ReLU / addition,
   channels-last, float32, same allocator),
   measured right after each of our runs; the ratio ours / floor is taken per round.
6. Peak memory (resident set, fresh processes) for layers of 320 and 1280 channels.

The report starts with the machine: the CPU's model, torch's CPU capability and whether
bfloat16 is native. Every number printed is measured in this run; nothing is copied from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' progress bars would flood the report

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from scorecam_explorer import device, planner, rewriting  # noqa: E402
from scorecam_explorer.compose import scorecam  # noqa: E402
from scorecam_explorer.engine import compute_cache  # noqa: E402
from scorecam_explorer.images import load_image  # noqa: E402
from scorecam_explorer.models import load_model  # noqa: E402
from scorecam_explorer.preprocessing import Preprocessing  # noqa: E402


# ---- helpers ---------------------------------------------------------------------------


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(average_ranks(np.asarray(a)), average_ranks(np.asarray(b)))


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def ours(model, inputs, layer, **options):
    """compute_cache as a user calls it: the first call in a process measures the batch plan
    (and folds the model once), later calls reuse both."""
    return compute_cache(model, inputs, layer, progress=False, **options)


def pytorch_grad_cam_map(module, layer_module, inputs, target) -> np.ndarray:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = ScoreCAM(module, target_layers=[layer_module])
    return cam(inputs, targets=[ClassifierOutputTarget(target)])[0]


def torchcam_map(module, layer_name, inputs, target) -> np.ndarray:
    from torchcam.methods import ScoreCAM

    with ScoreCAM(module, target_layer=layer_name, input_shape=tuple(inputs.shape[1:])) as extractor:
        with torch.no_grad():
            module(inputs)
        return extractor(class_idx=target)[0].numpy()


_USER_SCRIPT = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from pytorch_grad_cam import ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scorecam_explorer.models import load_model
inputs = torch.from_numpy(np.load(sys.argv[1]))
model = load_model().module
cam = ScoreCAM(model, target_layers=[getattr(model, sys.argv[2])])
start = time.perf_counter()
heatmap = cam(inputs, targets=[ClassifierOutputTarget(int(sys.argv[3]))])[0]
seconds = time.perf_counter() - start
np.save(sys.argv[4], heatmap)
high_water = [r for r in Path("/proc/self/status").read_text().splitlines() if r.startswith("VmHWM:")]
print(json.dumps({"seconds": seconds, "peak_rss_mb": int(high_water[0].split()[1]) / 1024}))
"""


def pytorch_grad_cam_as_users_run_it(inputs: torch.Tensor, layer: str, target: int) -> tuple[float, float, np.ndarray]:
    """pytorch-grad-cam's ScoreCAM with its defaults in a fresh process (default glibc malloc)."""
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "x.npy", inputs.numpy())
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        environment["PYTHONPATH"] = str(REPOSITORY)
        result = subprocess.run(
            [sys.executable, "-c", _USER_SCRIPT, str(Path(folder) / "x.npy"), layer, str(target), str(Path(folder) / "map.npy")],
            capture_output=True, text=True, env=environment, check=True,
        )
        report = json.loads(result.stdout.strip().splitlines()[-1])
        return report["seconds"], report["peak_rss_mb"], np.load(Path(folder) / "map.npy")


_MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np, torch
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.models import load_model
def high_water_mb():
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
inputs = torch.from_numpy(np.load(sys.argv[1]))
model = load_model()
with torch.inference_mode():
    model.module(inputs)
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current size
before = high_water_mb()
cache = compute_cache(model, inputs, sys.argv[2], progress=False)
after = high_water_mb()
print(json.dumps({"before_mb": before, "after_mb": after, "channels": int(cache[sys.argv[2]].sizes["channel"])}))
"""


def peak_memory(inputs: torch.Tensor, layer: str) -> dict:
    """Resident-memory high-water mark of compute_cache in a fresh process (Linux /proc)."""
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "x.npy", inputs.numpy())
        result = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(Path(folder) / "x.npy"), layer],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPOSITORY)}, check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])


def forward_floor(module: torch.nn.Module, inputs: torch.Tensor, plans, repeats: int = 3) -> tuple[float, object]:
    """Best seconds per image of one forward pass of masked inputs over the candidate plans."""
    best = (float("inf"), None)
    masks = torch.rand(max(plan.batch_size for plan in plans), 1, *inputs.shape[-2:])
    with planner.threads_restored(), torch.inference_mode():
        for plan in plans:
            planner.apply_plan(plan)
            batch = (inputs[0] * masks[: plan.batch_size]).contiguous(memory_format=torch.channels_last)
            module(batch)  # warm up this shape
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                module(batch)
                times.append((time.perf_counter() - start) / plan.batch_size)
            best = min(best, (statistics.median(times), plan), key=lambda item: item[0])
    return best


def line(label: str, value: str) -> None:
    print(f"  {label:<58} {value}")


# ---- the benchmark ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="96x96 inputs and one round (about a minute)")
    parser.add_argument("--repeats", type=int, help="rounds of interleaved timings (default 3, quick 1)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    size = 96 if args.quick else 224
    results: dict[str, float] = {}

    device.tune_allocator()  # every in-process implementation shares these settings
    print(f"Score-CAM benchmark ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device.usable_cpus()} CPUs, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}, allocator tuned: {device.allocator_tuned()}")
    for text in device.machine_description("cpu"):
        print(text)
    bf16_support = device.bfloat16_support("cpu")
    with_bf16 = bf16_support.native
    if not with_bf16:
        print(f"bfloat16 rows skipped: this CPU has no native bfloat16 ({bf16_support.found}); "
              "bfloat16 passes would take minutes here, and compute_cache refuses them")

    lite0 = load_model()
    preprocessing = Preprocessing(resize=round(size * 256 / 224), crop=size, mean=lite0.preprocessing.mean,
                                  std=lite0.preprocessing.std)
    x = preprocessing.to_tensor(load_image("sample:chelsea"))[None]
    with torch.inference_mode():
        target = int(lite0.module(x).argmax())
    layer = lite0.default_layer
    layer_module = lite0.module.get_submodule(layer)
    print(f"\n1. {lite0.name} '{layer}', sample:chelsea at {size}x{size}, class {target} ({lite0.class_names[target]})")

    timings: dict[str, list[float]] = {"ours": [], "ours_bf16": [], "pgc": [], "torchcam": []}
    first_call, _ = timed(ours, lite0, x, layer, convention="pytorch-grad-cam")
    if with_bf16:
        first_call_bf16, _ = timed(ours, lite0, x, layer, convention="pytorch-grad-cam", precision="bfloat16")
    # the floor is measured right after each of our runs: a shared machine's speed drifts
    # between rounds by more than the gap being measured
    folded = rewriting.folded_batchnorm(lite0.module, rewriting.copy_key(lite0.module, lite0.fingerprint(), "cpu"), channels_last=True)
    masked_module = (rewriting.fused_copy(folded) or folded) if folded is not None else lite0.module
    floors: list[tuple[float, float, object]] = []  # (ours / floor, seconds per image, plan)
    for _ in range(repeats):
        seconds, cache = timed(ours, lite0, x, layer, convention="pytorch-grad-cam")
        timings["ours"].append(seconds)
        per_image, best_plan = forward_floor(masked_module, x, planner.candidate_plans(torch.device("cpu")))
        n_forwarded = int(cache[layer].sizes["channel"]) - int(cache[layer]["constant"].values.sum())
        floors.append((seconds / ((n_forwarded + 2) * per_image), per_image, best_plan))
        seconds, pgc_heatmap = timed(pytorch_grad_cam_map, lite0.module, layer_module, x, target)
        timings["pgc"].append(seconds)
        seconds, _ = timed(torchcam_map, lite0.module, layer, x, target)
        timings["torchcam"].append(seconds)
        if with_bf16:
            seconds, cache_bf16 = timed(ours, lite0, x, layer, convention="pytorch-grad-cam", precision="bfloat16")
            timings["ours_bf16"].append(seconds)
    user_runs = [pytorch_grad_cam_as_users_run_it(x, layer, target) for _ in range(1 if args.quick else 2)]
    pgc_user = statistics.median(run[0] for run in user_runs)
    pgc_user_rss = max(run[1] for run in user_runs)
    median = {name: statistics.median(values) for name, values in timings.items() if values}

    node = cache[layer]
    constant = int(node["constant"].values.sum())
    forwarded = int(node.sizes["channel"]) - constant
    our_map = scorecam(cache, layer, target, preset="pytorch-grad-cam", image=0).values
    r_pgc = pearson(our_map, pgc_heatmap)
    r_user = pearson(our_map, user_runs[0][2])

    line("channels / constant (skipped exactly) / forwarded", f"{node.sizes['channel']} / {constant} / {forwarded}")
    line("ours, float32 exact: first call in the process", f"{first_call:.2f} s (folds the model, measures the plan)")
    line("ours, float32 exact: later calls (median of rounds)", f"{median['ours']:.2f} s")
    if with_bf16:
        line("ours, bfloat16: first call / later calls", f"{first_call_bf16:.2f} s / {median['ours_bf16']:.2f} s")
    line("pytorch-grad-cam, as users run it (fresh process, defaults)", f"{pgc_user:.2f} s")
    line("pytorch-grad-cam, this process (median of rounds)", f"{median['pgc']:.2f} s")
    line("torchcam, this process (median of rounds)", f"{median['torchcam']:.2f} s")
    line("speed-up, first call vs pytorch-grad-cam as users run it (>= 5)", f"{pgc_user / first_call:.1f}x")
    line("speed-up vs pytorch-grad-cam, same process (target >= 2.5)", f"{median['pgc'] / median['ours']:.1f}x")
    line("speed-up vs torchcam, same process", f"{median['torchcam'] / median['ours']:.1f}x")
    line("map Pearson r vs pytorch-grad-cam (target >= 0.999)", f"{r_pgc:.5f} (fresh-process run: {r_user:.5f})")
    results.update(
        lite0_ours_s=median["ours"], lite0_ours_first_call_s=first_call,
        lite0_pgc_user_s=pgc_user, lite0_pgc_inprocess_s=median["pgc"], lite0_torchcam_inprocess_s=median["torchcam"],
        lite0_r_pgc=r_pgc, lite0_forwarded=forwarded, lite0_constant=constant,
    )
    if with_bf16:
        bf16_map = scorecam(cache_bf16, layer, target, preset="pytorch-grad-cam", image=0).values
        weights = softmax(node["masked_logits"].values[0, :, target])
        weights_bf16 = softmax(cache_bf16[layer]["masked_logits"].values[0, :, target])
        rho = spearman(weights, weights_bf16)
        r_bf16 = pearson(our_map, bf16_map)
        line("bf16 first call vs pytorch-grad-cam as users run it (>= 10)", f"{pgc_user / first_call_bf16:.1f}x")
        line("bf16 faithfulness: Spearman of channel weights vs fp32 (>= 0.99)", f"{rho:.4f}")
        line("bf16 faithfulness: map Pearson r vs fp32 (>= 0.99)", f"{r_bf16:.4f}")
        results.update(
            lite0_ours_bf16_s=median["ours_bf16"], lite0_ours_bf16_first_call_s=first_call_bf16,
            bf16_spearman=rho, bf16_map_r=r_bf16,
        )
    else:
        line("ours, bfloat16", "skipped: no native bfloat16 on this CPU (see the top)")

    # 5. the floor, in the configuration compute_cache used, measured in every round
    ratio, per_image, best_plan = sorted(floors, key=lambda item: item[0])[len(floors) // 2]
    floor = (forwarded + 2) * per_image
    print(f"\n5. Floor: one forward of a masked batch at the best plan {tuple(best_plan)}, measured right after "
          f"each of our runs (median round shown): {per_image * 1000:.1f} ms/image")
    line(f"floor = ({forwarded} + 2) x {per_image * 1000:.1f} ms", f"{floor:.2f} s")
    line("ours / floor, same round (median of rounds; target <= 1.15)", f"{ratio:.2f}")
    line("  every round", " ".join(f"{item[0]:.2f}" for item in floors))
    results.update(floor_s=floor, ours_over_floor=ratio, forward_ms_per_image=per_image * 1000)

    # 2. ResNet-18 layer4
    resnet = load_model("resnet18", weights=None)
    xr = (x if args.quick else resnet.preprocessing.to_tensor(load_image("sample:chelsea"))[None])
    with torch.inference_mode():
        resnet_target = int(resnet.module(xr).argmax())
    resnet_times: dict[str, list[float]] = {"ours": [], "pgc": []}
    resnet_first, _ = timed(ours, resnet, xr, "layer4", convention="pytorch-grad-cam")
    resnet_folded = rewriting.folded_batchnorm(
        resnet.module, rewriting.copy_key(resnet.module, resnet.fingerprint(), "cpu"), channels_last=True
    )
    resnet_masked = (rewriting.fused_copy(resnet_folded) or resnet_folded) if resnet_folded is not None else resnet.module
    # per round: (pgc / ours, pgc / our floor); the second bounds what any overhead cut could give
    resnet_rounds: list[tuple[float, float]] = []
    for _ in range(repeats):
        seconds, resnet_cache = timed(ours, resnet, xr, "layer4", convention="pytorch-grad-cam")
        resnet_times["ours"].append(seconds)
        per_image, _ = forward_floor(resnet_masked, xr, planner.candidate_plans(torch.device("cpu")))
        n_forwarded = int(resnet_cache["layer4"].sizes["channel"]) - int(resnet_cache["layer4"]["constant"].values.sum())
        seconds, resnet_pgc = timed(pytorch_grad_cam_map, resnet.module, resnet.module.layer4, xr, resnet_target)
        resnet_times["pgc"].append(seconds)
        resnet_rounds.append((seconds / resnet_times["ours"][-1], seconds / ((n_forwarded + 2) * per_image)))
    resnet_median = {name: statistics.median(values) for name, values in resnet_times.items()}
    resnet_map = scorecam(resnet_cache, "layer4", resnet_target, preset="pytorch-grad-cam", image=0).values
    print(f"\n2. resnet18 (random weights) 'layer4', {xr.shape[-1]}x{xr.shape[-1]}, "
          f"{int(resnet_cache['layer4']['constant'].values.sum())} constant of 512")
    line("ours first call / later calls", f"{resnet_first:.2f} s / {resnet_median['ours']:.2f} s")
    line("ours / pytorch-grad-cam, same process (medians)", f"{resnet_median['ours']:.2f} s / {resnet_median['pgc']:.2f} s")
    line("speed-up (target >= 1.5)", f"{resnet_median['pgc'] / resnet_median['ours']:.2f}x")
    line("  every round", " ".join(f"{item[0]:.2f}x" for item in resnet_rounds))
    resnet_ceiling = statistics.median(item[1] for item in resnet_rounds)
    line("pytorch-grad-cam / our floor (the most any cut of overhead could give)", f"{resnet_ceiling:.2f}x")
    line("map Pearson r vs pytorch-grad-cam", f"{pearson(resnet_map, resnet_pgc):.5f}")
    results.update(
        resnet_ours_s=resnet_median["ours"],
        resnet_ours_first_call_s=resnet_first,
        resnet_pgc_s=resnet_median["pgc"],
        resnet_pgc_over_floor=resnet_ceiling,
    )

    # 3. ten classes and 4. recomposition latency
    classes = [int(c) for c in np.argsort(cache["logits"].values[0])[::-1][:10]]
    compose_times = []
    for preset_index, klass in enumerate(classes):
        seconds, _ = timed(scorecam, cache, layer, klass, preset="pytorch-grad-cam")
        compose_times.append(seconds)
    ten_classes = first_call + sum(compose_times)
    print("\n3. Maps of 10 classes")
    line("ours: one compute (first call) + 10 recompositions", f"{ten_classes:.2f} s")
    line("pytorch-grad-cam as users run it: 10 x its single run", f"{10 * pgc_user:.1f} s")
    line("speed-up (target >= 30)", f"{10 * pgc_user / ten_classes:.1f}x")
    results.update(ten_classes_s=ten_classes, ten_classes_speedup=10 * pgc_user / ten_classes)

    rng = np.random.default_rng(0)
    presets = ["paper", "official", "pytorch-grad-cam", "torchcam"]
    latencies = {"new class": [], "new preset": [], "channel subset (640)": []}
    for index in range(40 if not args.quick else 12):
        latencies["new class"].append(timed(scorecam, cache, layer, int(rng.integers(1000)))[0])
        latencies["new preset"].append(timed(scorecam, cache, layer, target, preset=presets[index % 4])[0])
        subset = np.sort(rng.choice(node.sizes["channel"], 640, replace=False))
        latencies["channel subset (640)"].append(timed(scorecam, cache, layer, target, channels=subset)[0])
    print(f"\n4. Recomposing from the cache ({node.sizes['channel']} channels, map at {size}x{size}), median")
    for name, values in latencies.items():
        line(f"{name} (target <= 20 ms)", f"{statistics.median(values) * 1000:.1f} ms")
        results[f"recompose_{name.split(' (')[0].replace(' ', '_')}_ms"] = statistics.median(values) * 1000

    # 6. peak memory
    print("\n6. Peak resident memory of compute_cache, fresh processes (flat in the number of channels)")
    for memory_layer in ("blocks.15", layer):
        report = peak_memory(x, memory_layer)
        grown = report["after_mb"] - report["before_mb"]
        line(f"ours, '{memory_layer}' ({report['channels']} channels)", f"peak {report['after_mb']:.0f} MB (+{grown:.0f} MB during compute)")
        results[f"peak_growth_mb_{report['channels']}"] = grown
    line(f"pytorch-grad-cam, '{layer}' (fresh process, whole process)", f"peak {pgc_user_rss:.0f} MB")
    results["pgc_peak_rss_mb"] = pgc_user_rss

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
