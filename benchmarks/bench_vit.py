"""Score-CAM on a vision transformer, side by side: scorecam_explorer against pytorch-grad-cam.

Run:  python benchmarks/bench_vit.py            (ViT-B/16 at 224: 768 channels, tens of minutes on 2 CPU cores)
      python benchmarks/bench_vit.py --quick    (a small ViT, one round: a smoke test)

torchvision's ViT-B/16 (random weights, redrawn so that the maps vary: speed does not depend on
the weights, and no LayerNorm channel is constant, so all 768 channels are forwarded), the cat
photo at 224 x 224, the last block's first LayerNorm (pytorch-grad-cam's ViT tutorial's
layer), the ``pytorch-grad-cam`` convention and preset:

- pytorch-grad-cam ``ScoreCAM`` with the usual ``reshape_transform`` as its users run it (its
  defaults, a fresh process) and in this process, interleaved round by round with ours;
- ours, float32: first call and later calls (median);
- the floor: (channels + 2) x one forward per image at the best batch plan; ours / floor per round;
- ours in bfloat16, with its faithfulness against float32, only where the CPU computes in
  bfloat16 natively (skipped with the reason elsewhere);
- agreement: Pearson r between our map and pytorch-grad-cam's.

The report starts with the machine (CPU model, torch's CPU capability, native bfloat16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torchvision
from torch import nn

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from bench_scorecam import forward_floor, line, pearson, softmax, spearman, timed  # noqa: E402

from scorecam_explorer import device, planner  # noqa: E402
from scorecam_explorer.compose import scorecam  # noqa: E402
from scorecam_explorer.engine import compute_cache  # noqa: E402
from scorecam_explorer.images import load_image  # noqa: E402
from scorecam_explorer.models import from_module  # noqa: E402


def build_vit(quick: bool) -> nn.Module:
    """ViT-B/16 (or a small ViT for --quick) with its Linear layers redrawn at unit fan-in
    scale: torchvision starts the head at zero, which makes every class score 0."""
    torch.manual_seed(0)
    if quick:
        vit = torchvision.models.VisionTransformer(
            image_size=224, patch_size=16, num_layers=2, num_heads=3, hidden_dim=96, mlp_dim=192
        )
    else:
        vit = torchvision.models.vit_b_16(weights=None)
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
    return vit.eval()


def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ViT tutorial: drop the class token, patch tokens onto the 14 x 14 grid."""
    side = int(round((tensor.shape[1] - 1) ** 0.5))
    return tensor[:, 1:, :].reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)


def pytorch_grad_cam_map(vit: nn.Module, inputs: torch.Tensor, target: int) -> np.ndarray:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = ScoreCAM(vit, target_layers=[vit.encoder.layers[-1].ln_1], reshape_transform=reshape_transform)
    return cam(inputs, targets=[ClassifierOutputTarget(target)])[0]


_USER_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
import numpy as np, torch
from bench_vit import build_vit, pytorch_grad_cam_map
inputs = torch.from_numpy(np.load(sys.argv[1]))
vit = build_vit(sys.argv[3] == "quick")
start = time.perf_counter()
pytorch_grad_cam_map(vit, inputs, int(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def pytorch_grad_cam_as_users_run_it(inputs: torch.Tensor, target: int, quick: bool) -> float:
    """pytorch-grad-cam's ScoreCAM with its defaults in a fresh process (default glibc malloc)."""
    import json

    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "x.npy", inputs.numpy())
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        environment["PYTHONPATH"] = str(REPOSITORY)
        result = subprocess.run(
            [sys.executable, "-c", _USER_SCRIPT, str(Path(folder) / "x.npy"), str(target),
             "quick" if quick else "full", str(Path(__file__).resolve().parent)],
            capture_output=True, text=True, env=environment, check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small ViT and one round (a smoke test)")
    parser.add_argument("--repeats", type=int, help="rounds of interleaved timings (default 2, quick 1)")
    arguments = parser.parse_args(argv)
    repeats = arguments.repeats or (1 if arguments.quick else 2)

    device.tune_allocator()
    print(f"Score-CAM on a vision transformer ({'quick' if arguments.quick else 'full'}), "
          f"load average {os.getloadavg()[0]:.1f}")
    for text in device.machine_description("cpu"):
        print(text)
    vit = build_vit(arguments.quick)
    model = from_module(vit, name="ViT-B/16" if not arguments.quick else "small ViT")
    layer = model.default_layer
    inputs = model.preprocessing.to_tensor(load_image("sample:chelsea"))[None]
    with torch.inference_mode():
        target = int(vit(inputs).argmax())
    print(f"\n{model.name}, layer {layer!r}, sample:chelsea at {inputs.shape[-2]}x{inputs.shape[-1]}, class {target}")

    first_call, cache = timed(compute_cache, model, inputs, layer, convention="pytorch-grad-cam", progress=False)
    channels = int(cache[layer].sizes["channel"])
    forwarded = channels - int(cache[layer]["constant"].values.sum())
    plans = planner.candidate_plans(torch.device("cpu"))
    times: dict[str, list[float]] = {"ours": [], "pgc": [], "floor": []}
    their_map = None
    for _ in range(repeats):
        seconds, cache = timed(compute_cache, model, inputs, layer, convention="pytorch-grad-cam", progress=False)
        times["ours"].append(seconds)
        per_image, _ = forward_floor(vit, inputs, plans)
        times["floor"].append((forwarded + 2) * per_image)
        seconds, their_map = timed(pytorch_grad_cam_map, vit, inputs, target)
        times["pgc"].append(seconds)
    median = {key: statistics.median(values) for key, values in times.items()}
    user_seconds = pytorch_grad_cam_as_users_run_it(inputs, target, arguments.quick)
    our_map = scorecam(cache, layer, target, preset="pytorch-grad-cam", image=0).values

    line("channels / constant / forwarded", f"{channels} / {channels - forwarded} / {forwarded}")
    line("ours, float32: first call / later calls (median)", f"{first_call:.2f} s / {median['ours']:.2f} s")
    line("pytorch-grad-cam, as users run it (fresh process)", f"{user_seconds:.2f} s")
    line("pytorch-grad-cam, this process (median)", f"{median['pgc']:.2f} s")
    line("speed-up, first call vs pytorch-grad-cam as users run it (>= 2)", f"{user_seconds / first_call:.2f}x")
    line("speed-up vs pytorch-grad-cam, same process", f"{median['pgc'] / median['ours']:.2f}x")
    ratios = [ours / floor for ours, floor in zip(times["ours"], times["floor"])]
    line("ours / floor, same round (median; <= 1.15)", f"{statistics.median(ratios):.2f}")
    line("pytorch-grad-cam / our floor (the most any engine could give)", f"{median['pgc'] / median['floor']:.2f}x")
    line("map Pearson r vs pytorch-grad-cam (>= 0.999)", f"{pearson(our_map, their_map):.5f}")

    support = device.bfloat16_support("cpu")
    if not support.native:
        line("bfloat16", f"skipped: {support.describe()} has no native bfloat16")
        return 0
    bf16_first, bf16_cache = timed(
        compute_cache, model, inputs, layer, convention="pytorch-grad-cam", precision="bfloat16", progress=False
    )
    bf16_map = scorecam(bf16_cache, layer, target, preset="pytorch-grad-cam", image=0).values
    weights = softmax(cache[layer]["masked_logits"].values[0, :, target])
    bf16_weights = softmax(bf16_cache[layer]["masked_logits"].values[0, :, target])
    line("bf16 first call vs pytorch-grad-cam as users run it (>= 4)", f"{user_seconds / bf16_first:.2f}x")
    line("bf16 faithfulness: Spearman of weights / map r vs fp32", f"{spearman(weights, bf16_weights):.4f} / "
         f"{pearson(our_map, bf16_map):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
