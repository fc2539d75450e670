"""GPU check of cifarlab.step: captured vs eager training, same start, same batches, same RNG.

    python bench/gpu_step_check.py [--steps 60] [--out FILE]
    python bench/gpu_step_check.py --emulate   # a dry run on a CPU, graphs from tests/graph_emulation.py

Trains the course CNN twice from the same weights on the same batch plans (augmentation and dropout on, a
per-step cosine schedule so the learning rate changes every step): once eager, once with the step captured
in a CUDA graph and replayed; with torch's Adam, SGD, RMSprop, Adagrad (as CapturableAdagrad both times) and
the course's own Adam (in its capturable form both times), and torch's Adam and Nesterov SGD under a one-cycle
schedule, which cycles β1 / the momentum (read from a device tensor, in the form that can: Adam's
single-tensor capturable one, DeviceMomentumSGD, both times). Prints (and writes as JSON) the largest
parameter difference, relative to the parameter's scale, for fp32 and bf16 autocast, and the step modes.
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
from cifarlab.step import EvalStep, TrainStep


def train(net, capture: bool, batches, steps: int, dtype, opt_name: str):
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
    # the course's Adam in its capturable form both times: its plain form rounds differently, and in bf16 those
    # differences flip the signs of near-zero Adam steps (a 5% parameter difference after 8 steps on a CPU)
    onecycle = opt_name.endswith("onecycle")
    capturable_form = capture or opt_name in ("course_adam", "adagrad") or onecycle
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
    for plan in plans[:steps]:
        step(batches, plan)
        sched.step()
    sync(device)
    loss, acc, images = step.epoch_metrics()
    return {
        "mode": step.mode,
        "replays": step.replays,
        "seconds": time.perf_counter() - t0,
        "loss": loss,
        "acc": acc,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--emulate", action="store_true", help="on the CPU, with emulated CUDA graphs (a dry run)")
    args = p.parse_args()
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
            nets = {m: copy.deepcopy(base) for m in ("eager", "captured")}
            runs = {m: train(nets[m], m == "captured", batches, args.steps, dtype, opt_name) for m in nets}
            worst = 0.0
            with torch.no_grad():
                for a, b in zip(nets["eager"].parameters(), nets["captured"].parameters(), strict=True):
                    worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
            key = f"{opt_name}-{'bf16' if dtype else 'fp32'}"
            results[key] = {"max_rel_param_diff": worst, **{m: runs[m] for m in runs}}
            print(key, f"max relative parameter difference {worst:.2e}", runs, flush=True)
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
