"""Which batch plan (images per masked pass, CPU threads) the planner picks on this CPU, and
what each candidate plan costs, for EfficientNet-Lite0 ``head`` on the cat photo.

    python benchmarks/bench_plans.py                 # this CPU as it is
    python benchmarks/bench_plans.py --isa avx2      # torch's and oneDNN's kernels capped at AVX2

The planner was tuned on one CPU; this shows whether its choice holds on another (the
capped run stands in for a CPU without AVX-512). Each candidate plan is timed on its own with
a fixed ``batch_size`` and thread count, one call after a warm-up, and the planner's own pick
(a call with no fixed plan) is shown beside them. ``--isa`` restarts this script in a child
process with the caps set, since they must be set before torch is imported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=["avx2"], help="cap torch's and oneDNN's kernels (a CPU without AVX-512)")
    arguments = parser.parse_args()
    if arguments.isa and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        environment = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
        sys.exit(subprocess.call([sys.executable, __file__], env=environment))
    measure()


def measure() -> None:
    import torch

    from scorecam_explorer import load_model
    from scorecam_explorer.device import machine_description
    from scorecam_explorer.engine import compute_cache
    from scorecam_explorer.planner import _CHOSEN_PLANS, candidate_plans, forget_plans

    for line in machine_description("cpu"):
        print(line)
    print(f"load average {os.getloadavg()[0]:.1f}")
    model = load_model()
    threads = torch.get_num_threads()

    def timed(**options) -> float:
        compute_cache(model, "sample:chelsea", "head", progress=False, device="cpu", **options)  # warm-up
        start = time.perf_counter()
        compute_cache(model, "sample:chelsea", "head", progress=False, device="cpu", **options)
        return time.perf_counter() - start

    print("\nEfficientNet-Lite0 'head', float32, one call after a warm-up:")
    for plan in candidate_plans(torch.device("cpu")):
        torch.set_num_threads(plan.threads or threads)
        seconds = timed(batch_size=plan.batch_size, adapt_threads=False)
        print(f"  batch {plan.batch_size:>3}, {plan.threads or threads} thread(s): {seconds:6.2f} s")
    torch.set_num_threads(threads)
    forget_plans()
    seconds = timed()
    picked = sorted({(plan.batch_size, plan.threads) for plan in _CHOSEN_PLANS.values()})
    print(f"  the planner's pick {picked}: {seconds:6.2f} s")


if __name__ == "__main__":
    main()
