"""Score-CAM on a GPU: ResNet-50 ``layer4`` (2048 channels), scorecam_explorer against
pytorch-grad-cam's ``ScoreCAM`` on the same card, model, input, layer and class.

    python benchmarks/bench_gpu.py                 # CUDA: prints the card's name and the ratios
    python benchmarks/bench_gpu.py --device cpu --size 64 --repeats 1   # a smoke run anywhere

Timed in one process, interleaved round by round, each timing synchronised with the device:

1. ours, exact (float32, ``pytorch-grad-cam`` mask convention): first call in the process
   (measures the batch plan) and later calls (median);
2. ours, bfloat16 autocast (opt-in), with its faithfulness (Spearman of the channel weights
   and Pearson r of the maps against float32), only where the device computes in bfloat16
   natively (a CUDA card of compute capability 8.0 or newer; on a CPU, AVX512-BF16 or AMX):
   elsewhere these rows are skipped with the reason printed;
3. pytorch-grad-cam ``ScoreCAM`` with its defaults (batch size 16) on the same device;
4. agreement: Pearson r between our recomposed map and pytorch-grad-cam's.

ResNet-50 runs with random weights (seeded): no download is needed, and speed does not
depend on the weights' values. The report starts with the machine: the CPU's model and
torch's CPU capability, the GPU's name, and whether bfloat16 is native. Every number printed
is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from scorecam_explorer import compute_cache, scorecam  # noqa: E402
from scorecam_explorer.models import load_model  # noqa: E402
from scorecam_explorer.device import bfloat16_support, machine_description, resolve_device  # noqa: E402
from scorecam_explorer.planner import synchronize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scorecam import pearson, softmax, spearman  # noqa: E402  (the same statistics as the CPU benchmark)

LAYER = "layer4"


def timed(device: torch.device, function, *args, **kwargs) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, result


def pytorch_grad_cam_map(module: torch.nn.Module, inputs: torch.Tensor, target: int) -> np.ndarray:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = ScoreCAM(module, target_layers=[module.layer4])
    return cam(inputs, targets=[ClassifierOutputTarget(target)])[0]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run")
    parser.add_argument("--size", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of interleaved timings (default 3)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        for text in machine_description("cpu"):
            print(text)
        print("No CUDA device here: run this on a machine with a GPU (or pass --device cpu for a smoke run).")
        return 0
    device = resolve_device(args.device)
    for text in machine_description(device):
        print(text)
    bf16_support = bfloat16_support(device)
    with_bf16 = bf16_support.native
    if not with_bf16:
        print(f"bfloat16 rows skipped: {bf16_support.device} has no native bfloat16 ({bf16_support.found}); "
              "compute_cache refuses it there")

    torch.manual_seed(0)
    model = load_model("resnet50", weights=None)
    module = model.module.to(device).eval()
    inputs = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        target = int(module(inputs.to(device)).argmax())
    print(f"Score-CAM on {device_name(device)}: resnet50 (random weights) '{LAYER}', {args.size}x{args.size}, "
          f"class {target}, torch {torch.__version__}")

    def ours(precision: str = "float32"):
        return compute_cache(model, inputs, LAYER, convention="pytorch-grad-cam", device=str(device),
                             precision=precision, progress=False)

    first_call, _ = timed(device, ours)
    if with_bf16:
        first_call_bf16, _ = timed(device, ours, "bfloat16")
    times: dict[str, list[float]] = {"ours": [], "ours_bf16": [], "pgc": []}
    for _ in range(args.repeats):
        seconds, cache = timed(device, ours)
        times["ours"].append(seconds)
        if with_bf16:
            seconds, cache_bf16 = timed(device, ours, "bfloat16")
            times["ours_bf16"].append(seconds)
        seconds, theirs = timed(device, pytorch_grad_cam_map, module, inputs.to(device), target)
        times["pgc"].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items() if values}

    node = cache[LAYER]
    our_map = scorecam(cache, LAYER, target, preset="pytorch-grad-cam", image=0).values
    numbers: dict[str, object] = {
        "device": device_name(device),
        "channels": int(node.sizes["channel"]),
        "constant": int(node["constant"].values.sum()),
        "ours_first_call_s": first_call,
        "ours_s": median["ours"],
        "pgc_s": median["pgc"],
        "speedup": median["pgc"] / median["ours"],
        "r_pgc": pearson(our_map, theirs),
        "bf16_native": with_bf16,
    }
    rows = [
        ("channels / constant", f"{numbers['channels']} / {numbers['constant']}"),
        ("ours, float32 exact: first call / later calls (median)", f"{first_call:.3f} s / {median['ours']:.3f} s"),
        ("pytorch-grad-cam ScoreCAM, its defaults, same device", f"{median['pgc']:.3f} s"),
        ("speed-up, float32 (goal >= 4)", f"{numbers['speedup']:.1f}x"),
        ("map Pearson r vs pytorch-grad-cam (>= 0.999)", f"{numbers['r_pgc']:.5f}"),
    ]
    if with_bf16:
        bf16_map = scorecam(cache_bf16, LAYER, target, preset="pytorch-grad-cam", image=0).values
        weights = softmax(node["masked_logits"].values[0, :, target])
        weights_bf16 = softmax(cache_bf16[LAYER]["masked_logits"].values[0, :, target])
        numbers.update(
            ours_bf16_first_call_s=first_call_bf16,
            ours_bf16_s=median["ours_bf16"],
            speedup_bf16=median["pgc"] / median["ours_bf16"],
            bf16_spearman=spearman(weights, weights_bf16),
            bf16_map_r=pearson(our_map, bf16_map),
        )
        rows[2:2] = [
            ("ours, bfloat16: first call / later calls (median)", f"{first_call_bf16:.3f} s / {median['ours_bf16']:.3f} s")
        ]
        rows[5:5] = [("speed-up, bfloat16", f"{numbers['speedup_bf16']:.1f}x")]
        rows.append(
            ("bf16 faithfulness: Spearman of weights / map r vs fp32",
             f"{numbers['bf16_spearman']:.4f} / {numbers['bf16_map_r']:.4f}")
        )
    else:
        rows.append(("ours, bfloat16", f"skipped: no native bfloat16 on {bf16_support.device} (see the top)"))
    for label, value in rows:
        print(f"  {label:<58} {value}")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
