"""How long the explorer takes to react, in Python, to each interaction (no browser).

Every interaction is a widget value set as the browser would set it; the time runs until
every panel has recomposed and every figure has sent its update. Messages go through the
kernel's own JSON serialiser (jupyter_client's ``json_packer``), as in a notebook, so their
cost is counted too. The target is <= 50 ms for a layer of 1280 channels (EfficientNet-Lite0's
``head``).

    python benchmarks/bench_explorer.py                      # synthetic cache of head's shape
    python benchmarks/bench_explorer.py --cache lite0.zarr   # a real cache (any layers)
    python benchmarks/bench_explorer.py --compute            # compute the real one first (minutes on a CPU)

The synthetic cache has the real head's shapes (1280 channels of 7x7, 1000 classes, a 224 x
224 picture) and a second layer shaped like ``blocks.15`` (320 channels) for the scrubber;
like the real head, about half of its channels are all zero (ReLU6). Timings on shared
machines vary: the script reports the median and the worst of several repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

TARGET_MS = 50.0


def synthetic_cache(seed: int = 0) -> xr.DataTree:
    """A cache with the shapes of EfficientNet-Lite0's blocks.15 and head on one picture."""
    from scorecam_explorer.cache import LayerArrays, build_cache
    from scorecam_explorer.conventions import MASK_CONVENTIONS

    rng = np.random.default_rng(seed)
    n_classes, size = 1000, 224
    logits = rng.normal(0.0, 2.0, (1, n_classes)).astype(np.float32)
    logits[0, :5] += 8.0  # a few confident classes, as on a real photo

    def layer(n_channels: int, zero_fraction: float) -> LayerArrays:
        activation = np.clip(rng.normal(0.5, 1.5, (1, n_channels, 7, 7)), 0.0, 6.0).astype(np.float32)
        activation[:, rng.random(n_channels) < zero_fraction] = 0.0
        flat = activation.reshape(1, n_channels, -1)
        constant = flat.max(-1) == flat.min(-1)
        masked = logits[:, None, :] + rng.normal(0.0, 1.0, (1, n_channels, n_classes)).astype(np.float32)
        masked[constant] = logits[0] * 0.1
        return LayerArrays(activation=activation, masked_logits=masked, constant=constant)

    pixels = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return build_cache(
        pictures=pixels,
        inputs=((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2),
        logits=logits,
        baseline_logits=logits * 0.1,
        image_ids=["synthetic"],
        class_names=[f"class {index}" for index in range(n_classes)],
        layers={"blocks.15": layer(320, 0.05), "head": layer(1280, 0.5)},
        model_name="synthetic (EfficientNet-Lite0 head shapes)",
        weights_fingerprint="0" * 16,
        preprocessing={"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
        convention=MASK_CONVENTIONS["paper"],
        dtype="float32",
        device="cpu",
        forward_passes=0,
        seconds=0.0,
    )


def computed_cache() -> xr.DataTree:
    """The real cache: EfficientNet-Lite0 on sample:chelsea at blocks.15 and head."""
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.models import load_model

    return compute_cache(load_model(), "sample:chelsea", ["blocks.15", "head"], progress=True)


class KernelMessages:
    """Serialise every widget message as the kernel does, and count them."""

    def __init__(self) -> None:
        from comm import DummyComm
        from jupyter_client.session import json_packer

        self.count = 0
        self.bytes = 0
        counter = self

        def publish_msg(comm, msg_type, data=None, metadata=None, buffers=None, **keys):
            counter.count += 1
            counter.bytes += len(json_packer(data)) + sum(len(memoryview(b).cast("B")) for b in buffers or ())

        DummyComm.publish_msg = publish_msg


Interaction = Callable[[int], None] | tuple[Callable[[int], None], Callable[[int], None]]


def interactions(explorer, cache: xr.DataTree) -> dict[str, Interaction]:
    """name -> a function setting a widget to its i-th value, or (untimed setup, timed action)."""
    controls, recomposer, channels, compare = explorer.controls, explorer.recomposer, explorer.channels, explorer.compare
    top = [value for _, value in controls.target.options][:4]
    layers = explorer.state.layers
    head = explorer.state.channel_count(layers[-1])
    names = explorer.state.class_names

    return {
        "class picker": lambda i: setattr(controls.target, "value", top[i % len(top)]),
        "class search": lambda i: setattr(controls.search, "value", names[(37 * i + 11) % len(names)]),
        "preset": lambda i: setattr(controls.preset, "value", ("official", "pytorch-grad-cam", "torchcam", "paper")[i % 4]),
        "layer scrubber": lambda i: setattr(controls.layer, "value", layers[i % len(layers)]),
        "top-k slider": lambda i: setattr(recomposer.top_k, "value", (5, 40, 200, 900, head)[i % 5]),
        "switch channels off (text)": lambda i: setattr(recomposer.switched_off, "value", f"{i % 50}, {100 + i % 7}"),
        "reset": (lambda i: setattr(recomposer.switched_off, "value", f"{i % 50}, 7"), lambda i: recomposer.reset.click()),
        "sort by": lambda i: setattr(channels.sort_by, "value", ("variance", "contribution", "weight")[i % 3]),
        "channel box": lambda i: setattr(channels.channel, "value", (3 * i + 1) % head),
        "click a bar": lambda i: channels.bars.widget._handle_custom_msg(
            {"event": "click", "points": [{"trace": 0, "point": i % 30}]}, []
        ),
        "opacity": lambda i: setattr(explorer.map.opacity, "value", (0.3, 0.6)[i % 2]),
        "colour scale": lambda i: setattr(explorer.map.colormap, "value", ("viridis", "turbo", "jet")[i % 3]),
        "compare mode": lambda i: setattr(compare.mode, "value", ("layers", "classes", "presets")[i % 3]),
        "compare choice B": lambda i: setattr(compare.second, "value", [v for _, v in compare.second.options][(i + 1) % len(compare.second.options)]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="a saved cache to explore (default: a synthetic one of Lite0's head shape)")
    parser.add_argument("--compute", action="store_true", help="compute the real Lite0 cache (blocks.15, head) first")
    parser.add_argument("--repeat", type=int, default=12, help="repetitions per interaction (default 12)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    from scorecam_explorer.cache import load_cache
    from scorecam_explorer.explorer import Explorer

    if args.cache:
        cache, source = load_cache(args.cache), args.cache
    elif args.compute:
        cache, source = computed_cache(), "computed: efficientnet_lite0 on sample:chelsea"
    else:
        cache, source = synthetic_cache(), "synthetic, shapes of efficientnet_lite0 blocks.15 and head"
    messages = KernelMessages()
    started = time.perf_counter()
    explorer = Explorer(cache)
    build_seconds = time.perf_counter() - started
    head = explorer.state.layers[-1]
    print(f"cache: {source}; layers {', '.join(explorer.state.layers)}; "
          f"{explorer.state.channel_count(head)} channels in {head}")
    print(f"explorer built in {build_seconds:.2f} s (reads every layer once)\n")

    results = {}
    print(f"{'interaction':<28}{'wall median':>12}{'wall max':>9}{'CPU median':>11}{'msgs':>6}{'kB':>8}")
    for name, interaction in interactions(explorer, cache).items():
        setup, interact = interaction if isinstance(interaction, tuple) else (None, interaction)
        if explorer.state.selection.layer != head and name != "layer scrubber":
            explorer.controls.layer.value = head
        if setup:
            setup(0)
        interact(0)  # warm: first visits fill the memo, as a user's first move would
        times, cpu, counts, sizes = [], [], [], []
        for i in range(1, args.repeat + 1):
            if setup:
                setup(i)
            before_count, before_bytes = messages.count, messages.bytes
            start, start_cpu = time.perf_counter(), time.process_time()
            interact(i)
            times.append((time.perf_counter() - start) * 1000.0)
            cpu.append((time.process_time() - start_cpu) * 1000.0)
            counts.append(messages.count - before_count)
            sizes.append(messages.bytes - before_bytes)
        results[name] = {
            "median_ms": statistics.median(times),
            "max_ms": max(times),
            "cpu_median_ms": statistics.median(cpu),
            "messages": statistics.median(counts),
            "kilobytes": statistics.median(sizes) / 1000,
        }
        r = results[name]
        print(
            f"{name:<28}{r['median_ms']:>12.1f}{r['max_ms']:>9.1f}{r['cpu_median_ms']:>11.1f}"
            f"{r['messages']:>6.0f}{r['kilobytes']:>8.1f}"
        )
    worst = max(r["median_ms"] for r in results.values())
    verdict = "within" if worst <= TARGET_MS else "OVER"
    print(f"\nslowest median (wall): {worst:.1f} ms ({verdict} the {TARGET_MS:.0f} ms target)")
    print("CPU time is the process's own; wall time also holds waiting for the CPU on a busy machine.")
    if args.json:
        Path(args.json).write_text(json.dumps({"cache": source, "results": results}, indent=1))
    return 0 if worst <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
