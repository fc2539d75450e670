"""GPU check of cifarlab.step: captured vs eager training, same start, same batches, same RNG.

    python bench/gpu_step_check.py [--steps 40] [--out FILE]
    python bench/gpu_step_check.py --emulate   # a dry run on a CPU, graphs from tests/graph_emulation.py

Trains the course CNN twice from the same weights on the same batch plans (augmentation and dropout on, a
per-step cosine schedule so the learning rate changes every step): once eager, once with the step captured
in a CUDA graph and replayed; with torch's Adam, SGD, RMSprop (in its capturable form both times), Adagrad (as
CapturableAdagrad both times) and the course's own Adam (in its capturable form both times), and torch's Adam
and Nesterov SGD under a one-cycle schedule, which cycles β1 / the momentum (read from a device tensor, in the
form that can: Adam's single-tensor capturable one, DeviceMomentumSGD, both times). Prints (and writes as JSON) the largest
parameter difference, relative to the parameter's scale, for fp32 and bf16 autocast, and the step modes.

The eager run is repeated as a third run from the same start: the difference between the two eager runs is the
device's own noise (cuDNN's autotuned kernels may add in any order), the scale against which to read the captured
run's. Both are taken after ``--compare-at`` steps (5: the 3 eager warm-up steps and 2 replays, enough for a
stale buffer or random number to show) and at the end. The early one is the sharp one: this CNN's early Adam and
RMSprop steps are near sign steps, which amplify any difference (eager Adam from weights scaled by 1 + 1e-7 ends
31% away after 20 steps and 67% after 60, on a CPU). RMSprop runs its capturable form both times, the learning
rate a float when eager and a tensor when captured, which rounds differently: 1e-7 after the first replay,
7e-5 after the second, 15% after 8 (of 20) on emulated graphs (the other optimizers are bit for bit there).

Then evaluates the trained network with :class:`cifarlab.step.EvalStep` eager and captured (three passes
each, a short last batch) and prints both (loss, accuracy) pairs, which should agree to float rounding.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

from cifarlab.bench import sync
from cifarlab.capturable import optimizer_for_capture
from cifarlab.data import DeviceBatches, make_synthetic
from cifarlab.model import CifarCNN, parameter_groups
from cifarlab.module import build_optimizer
from cifarlab.step import WARMUP_STEPS, EvalStep, TrainStep


def train(net, capture: bool, batches, steps: int, dtype, opt_name: str, compare_at: int):
    """``steps`` training steps of ``net`` in place: the run's mode, time and epoch metrics, and copies of the
    parameters after ``compare_at`` steps."""
    from cifarlab.optim import Adam as CourseAdam

    classes = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
    classes = {**classes, "course_adam": CourseAdam, "adam_onecycle": torch.optim.Adam}
    classes.update(nesterov_onecycle=torch.optim.SGD, adagrad=torch.optim.Adagrad)
    cls = classes[opt_name]
    kw = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    kw = {**kw, "nesterov": True} if opt_name.startswith("nesterov") else kw
    lr = 0.01 if cls is torch.optim.SGD else 1e-3
    factory = functools.partial(cls, lr=lr, **kw)  # as Hydra builds it
    groups = parameter_groups(net, 1e-4)
    # the course's Adam (and RMSprop) in its capturable form both times: its plain form rounds differently, and in
    # bf16 those differences flip the signs of near-zero Adam steps (a 5% parameter difference after 8 steps on a
    # CPU); the forms are compared with each other on small smooth nets in tests/test_capture.py
    onecycle = opt_name.endswith("onecycle")
    capturable_form = capture or opt_name in ("course_adam", "adagrad", "rmsprop") or onecycle
    opt = (
        optimizer_for_capture(factory, groups, device_momentum=onecycle)
        if capturable_form
        else build_optimizer(factory, groups)
    )
    if onecycle:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step = TrainStep(net, opt, capture=capture, autocast_dtype=dtype, clip_norm=5.0, device_momentum=onecycle)
    torch.manual_seed(7)  # the CPU's generator and every GPU's
    plans = []
    while len(plans) < steps:
        plans += list(batches.batch_plans())
    device = batches.images.device
    sync(device)
    t0 = time.perf_counter()
    early = None
    for i, plan in enumerate(plans[:steps], start=1):
        step(batches, plan)
        sched.step()
        if i == compare_at:
            early = [p.detach().clone() for p in net.parameters()]  # enqueued after the step: no host sync
    sync(device)
    loss, acc, images = step.epoch_metrics()
    run = {
        "mode": step.mode,
        "replays": step.replays,
        "seconds": time.perf_counter() - t0,
        "loss": loss,
        "acc": acc,
    }
    return run, early


def max_rel_diff(params_a, params_b) -> float:
    """The largest elementwise difference of two parameter lists, relative to each tensor's largest value."""
    with torch.no_grad():
        pairs = zip(params_a, params_b, strict=True)
        return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in pairs)


def main() -> None:
    p = argparse.ArgumentParser()
    # 3 runs of 40 steps take the time 2 runs of 60 took: an epoch of 21 batches (the last one short) and 19 more
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compare-at", type=int, default=WARMUP_STEPS + 2, help="the early comparison's step")
    p.add_argument("--out", default=None)
    p.add_argument("--emulate", action="store_true", help="on the CPU, with emulated CUDA graphs (a dry run)")
    args = p.parse_args()
    if args.steps < 1 or args.compare_at < 1:
        p.error(f"--steps ({args.steps}) and --compare-at ({args.compare_at}) must be at least 1")
    compare_at = min(args.compare_at, args.steps)
    optimizers = ("adam", "sgd", "rmsprop", "adagrad", "course_adam", "adam_onecycle", "nesterov_onecycle")
    dev = torch.device("cuda")
    if args.emulate:
        from _pytest.monkeypatch import MonkeyPatch

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/
        from tests import graph_emulation

        graph_emulation.install(MonkeyPatch())
        dev = torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    x, y = make_synthetic(64 * 20 + 40, seed=1)  # 20 full batches and a short one per epoch
    batches = DeviceBatches(
        x.to(dev), y.to(dev), 64, mean=[0.5] * 3, std=[0.25] * 3, shuffle=True, augment=True, seed=3
    )
    results = {}
    for opt_name in optimizers:
        for dtype in (None, torch.bfloat16):
            torch.manual_seed(0)
            base = CifarCNN(10, dropout=0.5).to(dev).to(memory_format=torch.channels_last)
            nets = {m: copy.deepcopy(base) for m in ("eager", "captured", "eager_again")}
            runs, early = {}, {}
            for m, net in nets.items():
                runs[m], early[m] = train(
                    net, m == "captured", batches, args.steps, dtype, opt_name, compare_at
                )
            end = {m: list(nets[m].parameters()) for m in nets}
            key = f"{opt_name}-{'bf16' if dtype else 'fp32'}"
            results[key] = {
                "max_rel_param_diff": max_rel_diff(end["eager"], end["captured"]),
                "max_rel_param_diff_early": max_rel_diff(early["eager"], early["captured"]),
                "noise": max_rel_diff(end["eager"], end["eager_again"]),
                "noise_early": max_rel_diff(early["eager"], early["eager_again"]),
                **runs,
            }
            r = results[key]
            print(
                f"{key:24} captured vs eager {r['max_rel_param_diff_early']:.1e} after {compare_at} steps, "
                f"{r['max_rel_param_diff']:.1e} after {args.steps} | eager vs eager again {r['noise_early']:.1e}, "
                f"{r['noise']:.1e} | loss {runs['eager']['loss']:.4f} / {runs['captured']['loss']:.4f} | "
                f"modes {runs['eager']['mode']} / {runs['captured']['mode']} ({runs['captured']['replays']} replays)",
                flush=True,
            )
    eval_batches = DeviceBatches(x.to(dev), y.to(dev), 500, mean=[0.5] * 3, std=[0.25] * 3)
    net = nets["captured"].eval()
    for dtype in (None, torch.bfloat16):
        passes = {}
        for capture in (False, True):
            step = EvalStep(net, capture=capture, autocast_dtype=dtype)
            with torch.inference_mode():
                for _ in range(3):  # the first pass warms up, the second captures, the third replays
                    step.reset()
                    for xb, yb in eval_batches:
                        step(xb, yb)
                    passes[capture] = EvalStep.metrics(step.totals())
            passes[f"replays_{capture}"] = step.replays
        key = f"eval-{'bf16' if dtype else 'fp32'}"
        results[key] = {"eager": passes[False], "captured": passes[True], "replays": passes["replays_True"]}
        print(key, results[key], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
