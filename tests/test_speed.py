"""Speed work must not change what is learned: the batched augmentation, the data pipeline's layouts, the
precision defaults, the optimizer implementation and the model's block order; and ``make bench`` runs."""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, compose_train
from torch import nn

from cifarlab import bench
from cifarlab.data import DeviceBatches, channel_stats, crop_flip, make_synthetic
from cifarlab.model import CifarCNN, parameter_groups
from cifarlab.module import build_optimizer
from cifarlab.train import resolve_precision

# ---- crop/flip and DeviceBatches ---------------------------------------------------------------------------


def _reference_crop_flip(images: torch.Tensor, seed: int, pad: int = 4) -> torch.Tensor:
    """One image at a time, from the same draws as crop_flip: dy, dx, then flip, each (B,) from one generator."""
    b, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=g).flatten().tolist()
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=g).flatten().tolist()
    flip = torch.randint(0, 2, (b, 1, 1), generator=g).flatten().tolist()
    padded = F.pad(images, (pad, pad, pad, pad))
    out = [padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]
    return torch.stack([o.flip(2) if f else o for o, f in zip(out, flip, strict=True)])


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (5, 3, 20, 24), (1, 3, 8, 8), (7, 1, 16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_flip_is_the_per_image_crop_in_either_layout(shape, channels_last):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out = crop_flip(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, _reference_crop_flip(images.contiguous(), seed=3))
    if channels_last and shape[1] > 1 and shape[0] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_batches_are_the_same_in_both_layouts_and_repeatable():
    x, y = make_synthetic(300, seed=1)
    kw = dict(mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], shuffle=True, augment=True, seed=5)
    nhwc = list(DeviceBatches(x, y, 64, channels_last=True, **kw))
    nchw = list(DeviceBatches(x, y, 64, channels_last=False, **kw))
    again = list(DeviceBatches(x, y, 64, channels_last=True, **kw))
    assert [len(b[1]) for b in nhwc] == [64, 64, 64, 64, 44]
    for (a, ya), (b, yb), (c, yc) in zip(nhwc, nchw, again, strict=True):
        assert a.dtype == torch.float32 and a.is_contiguous(memory_format=torch.channels_last)
        assert b.is_contiguous()
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(ya, yb) and torch.equal(ya, yc)


def test_normalisation_is_fused_and_exact():
    x, y = make_synthetic(50, seed=2)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    (xb, yb), *_ = DeviceBatches(x, y, 50, mean=mean, std=std)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(xb, expected, atol=1e-5) and torch.equal(yb, y)


def test_synthetic_data_is_the_whole_tensor_formula_byte_for_byte():
    """make_synthetic works in place and in chunks; the bytes are those of the formula on whole tensors."""
    n, classes, seed, size = 5000, 10, 3, 32
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size + 8, size + 8), mode="bicubic", align_corners=False)
    labels = torch.randint(0, classes, (n,), generator=g)
    shifts = torch.randint(0, 81, (n,), generator=g)
    crops = torch.stack(
        [
            templates[i, :, s // 9 : s // 9 + size, s % 9 : s % 9 + size]
            for i, s in zip(labels.tolist(), shifts.tolist(), strict=True)
        ]
    )
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    noise = torch.randn(n, 3, size, size, generator=g) * 0.5
    expected = ((0.5 + 0.3 * contrast * (crops - 0.5) + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    images, got_labels = make_synthetic(n, classes, seed=seed, image_size=size)
    assert torch.equal(got_labels, labels) and torch.equal(images, expected)


def test_channel_stats_from_histograms_are_exact():
    x, _ = make_synthetic(200, seed=4)
    mean, std = channel_stats(x)
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(ref.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)


# ---- precision, optimizer implementation, model block order ------------------------------------------------


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    assert resolve_precision("32", "cpu") == "32" and resolve_precision(32, "auto") == "32"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda n=native: n)
        want = "bf16-mixed" if native else "32-true"
        assert resolve_precision("auto", "cpu") == want and resolve_precision("auto", "auto") == want
    assert resolve_precision("auto", "gpu") == "32-true"  # asked for a GPU, found none: no bf16 guess
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda n=native: n)
        assert resolve_precision("auto", "gpu") == ("bf16-mixed" if native else "32-true")


def test_the_config_asks_for_fast_defaults_and_fp32_on_request():
    t = compose_train([]).trainer
    assert t.precision == "auto" and t.channels_last is True and t.compile is False
    assert compose_train(["trainer.precision=32"]).trainer.precision == 32
    assert compose_train(["experiment=seed_baseline"]).trainer.precision == 32  # the course's run stays fp32


def test_optimizers_get_torchs_fastest_implementation_of_the_same_rule():
    net = CifarCNN()
    groups = lambda: parameter_groups(net, 1e-4)  # noqa: E731
    assert build_optimizer(functools.partial(torch.optim.Adam, lr=1e-3), groups()).defaults["fused"] is True
    assert build_optimizer(functools.partial(torch.optim.SGD, lr=0.1), groups()).defaults["fused"] is True
    assert (
        build_optimizer(functools.partial(torch.optim.RMSprop, lr=1e-3), groups()).defaults["foreach"] is True
    )
    explicit = build_optimizer(functools.partial(torch.optim.Adam, lr=1e-3, foreach=False), groups())
    assert explicit.defaults["foreach"] is False and not explicit.defaults["fused"]

    class Plain(torch.optim.SGD):  # a class without the switches (like the course's own optimizers)
        def __init__(self, params, lr=0.1):
            super().__init__(params, lr=lr)

    assert type(build_optimizer(Plain, groups())) is Plain
    # Same rule: a few fused Adam steps land where the per-tensor loop lands.
    torch.manual_seed(0)
    a, b = CifarCNN(dropout=0.0), CifarCNN(dropout=0.0)
    b.load_state_dict(a.state_dict())
    opts = [
        torch.optim.Adam(parameter_groups(a, 1e-4), lr=1e-3, foreach=False),
        build_optimizer(functools.partial(torch.optim.Adam, lr=1e-3), parameter_groups(b, 1e-4)),
    ]
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        for net_, opt in zip((a, b), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(net_(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_pooling_before_the_activation_is_the_same_block(activation):
    """CifarCNN pools before its (non-decreasing) activation; conv → act → pool gives the same outputs and
    the same gradients (bit for bit with ReLU)."""
    torch.manual_seed(0)
    net = CifarCNN(activation=activation, dropout=0.0)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    act = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]
    reference = nn.Sequential(*[layer for c in convs for layer in (c, act(), nn.MaxPool2d(2))])
    x = torch.randn(8, 3, 32, 32)
    ours = net.classifier(net.features(x))
    theirs = net.classifier(reference(x))
    exact = activation == "relu"
    assert torch.equal(ours, theirs) if exact else torch.allclose(ours, theirs, atol=1e-6)
    grads = []
    for out in (ours, theirs):
        net.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in net.parameters()])
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2) if exact else torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)
    assert list(net.state_dict()) == [
        f"{m}.{w}"
        for m in ("features.0", "features.3", "features.6", "classifier.1", "classifier.4")
        for w in ("weight", "bias")
    ]


# ---- the fast defaults learn what fp32 learns ---------------------------------------------------------------


@pytest.mark.slow
def test_fast_defaults_learn_as_well_as_fp32(tmp_path):
    """3 seeds x {the defaults (bf16 where native, channels_last), fp32 NCHW}, 2 short epochs each (~3 s a run).
    The mean validation accuracies must agree within 3 standard errors of their difference, estimated from
    the spread over seeds (at least 0.03), and both be far above chance (0.1)."""
    if resolve_precision("auto", "cpu") != "bf16-mixed":
        pytest.skip("this CPU has no native bf16: the defaults are fp32 here")
    from cifarlab.train import run

    base = [
        "data=synthetic",
        "data.train_size=3400",
        "data.val_size=400",
        "data.test_size=100",
        "data.batch_size=64",
        "data.eval_batch_size=400",
        "data.augment=false",
        "optimizer.lr=0.002",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "logger=none",
        "test=false",
        "callbacks.checkpoint=false",
        "callbacks.figures=false",
    ]
    variants = {"fast": [], "fp32": ["trainer.precision=32", "trainer.channels_last=false"]}
    acc: dict[str, list[float]] = {k: [] for k in variants}
    precisions = {}
    for seed in (0, 1, 2):
        for name, extra in variants.items():
            cfg = compose_train([*base, *extra, f"seed={seed}"], output_dir=tmp_path / f"{name}{seed}")
            metrics = run(cfg)
            acc[name].append(metrics["val/acc"])
            precisions[name] = metrics["precision"]
    assert precisions == {"fast": "bf16-mixed", "fp32": "32-true"}
    means = {k: statistics.mean(v) for k, v in acc.items()}
    pooled_sd = ((statistics.variance(acc["fast"]) + statistics.variance(acc["fp32"])) / 2) ** 0.5
    tolerance = max(0.03, 3 * pooled_sd * (2 / 3) ** 0.5)
    assert min(means.values()) > 0.5, acc
    assert abs(means["fast"] - means["fp32"]) <= tolerance, (acc, tolerance)


# ---- make bench ---------------------------------------------------------------------------------------------


def _fake_results(cuda: bool) -> dict:
    run = {
        "img_per_s": 5000.0,
        "epoch_s": 2.0,
        "batch_size": 128,
        "precision": "bf16-mixed",
        "layout": "NHWC",
    }
    results = {
        "machine": {
            "cpu": "CPU",
            "cores": 2,
            "torch": torch.__version__,
            "gpus": ["GPU"] if cuda else [],
            "cuda": cuda,
        },
        "settings": {"images": 10000, "repeats": 5},
        "runs": {
            "reference": {**run, "img_per_s": 1500.0, "batch_size": 64, "precision": "32-true"},
            "plain": {**run, "img_per_s": 5100.0},
            "train": run,
        },
        "ratios": {
            "train_over_reference": 3.33,
            "train_over_plain": 0.98,
            "train_over_reference_paired": 3.3,
            "train_over_plain_paired": 1.02,
        },
        "startup": {"help_s": 1.0, "first_step_s": 5.0, "first_step_wandb_offline_s": 8.0},
        "sweeper": {"async": {"utilisation": 0.9}, "sync": {"utilisation": 0.7}, "ratio": 1.3},
        "gpu_trials": {"skipped": "no CUDA device"},
    }
    if cuda:
        results["runs"]["train"] = {**run, "img_per_s": 320_000.0, "batch_size": 512, "step_mode": "captured"}
        results["runs"]["captured"] = {**run, "img_per_s": 380_000.0, "batch_size": 512}
        results["ratios"].update(train_over_captured=0.84, train_over_captured_paired=0.85)
        results["gpu_trials"] = {
            "batch_size": 512,
            "by_trials": {
                "1": {"img_per_s": 120_000.0, "over_one": 1.0},
                "4": {"img_per_s": 330_000.0, "over_one": 2.75},
            },
        }
        results["seed_baseline"] = {"epochs": 50, "data": "cifar10", "duration_s": 38.0, "wall_s": 55.0}
    return results


@pytest.mark.parametrize("cuda", [False, True])
def test_bench_table_and_target_checks(cuda):
    results = _fake_results(cuda)
    text = bench.table(results)
    assert "(c)/(b) 0.98 (paired 1.02)" in text and "start-up" in text and "sweeper" in text
    met = bench.check_targets(results)["met"]
    assert ("targets on a GPU: (c) >= 60,000 img/s" in text) == cuda
    assert ("targets on a CPU" in text) != cuda
    assert "targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in met.items()) in text
    if cuda:
        assert "120,000 img/s" in text and "seed_baseline (50 epochs" in text
        assert "(c)/(b') 0.84 (paired 0.85)" in text and "captured" in text
        assert met == {
            "gpu_train_img_per_s_b512_bf16": True,
            "gpu_train_over_captured": True,
            "gpu_one_trial_img_per_s": True,
            "gpu_four_over_one_trials": True,
            "gpu_seed_baseline_s": True,
        }
    else:
        assert "(c)/(a) 3.33x" in text and "skipped" in text
        assert met == {"cpu_train_over_reference": True, "cpu_train_over_plain": True}


def _make_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``python -m cifarlab.bench ARGS`` (no start-up or sweeper figures) in a subprocess: what it printed and
    the results it wrote to ``tmp_path/bench.json``."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlab.bench", *args, "--no-startup", "--no-sweeper", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_make_bench_writes_the_side_by_side_results(tmp_path):
    proc, results = _make_bench(tmp_path, "--images", "512", "--repeats", "2", "--warmup-steps", "1")
    assert "(c)/(a)" in proc.stdout and "(c)/(b)" in proc.stdout
    assert {"cpu", "cores", "torch", "gpus", "cuda"} <= set(results["machine"])
    assert results["settings"]["images"] == 512 and results["settings"]["data"] == "synthetic"
    for kind, batch in (("reference", 64), ("plain", 128), ("train", 128)):
        r = results["runs"][kind]
        assert r["img_per_s"] > 0 and r["epoch_s"] > 0 and r["batch_size"] == batch
        assert r["repeats"][0]["images"] == 512
        # without a GPU each repetition runs in new worker processes (a process's own speed would bias it)
        pids = [rep["worker_pid"] for rep in r["repeats"]]
        assert len(set(pids)) == 2 and os.getpid() not in pids, pids
    assert results["settings"]["fresh_workers"] is True
    assert results["runs"]["reference"]["precision"] == "32-true"
    assert results["runs"]["train"]["precision"] == results["runs"]["plain"]["precision"]
    assert results["ratios"]["train_over_reference"] > 0 and results["ratios"]["train_over_plain"] > 0
    assert "skipped" in results["gpu_trials"] or "by_trials" in results["gpu_trials"]
    assert "met" in results["checks"]
    assert not (Path(ROOT) / "bench" / "results" / "bench.json").exists()


def test_bench_with_every_variant_skipped_reports_nothing_rather_than_crashing(tmp_path):
    args = bench.parse_args(["--skip", *bench.KINDS])
    assert bench.side_by_side(args, {}, [], tmp_path, log=lambda msg: None) == {}
    results = _fake_results(cuda=False)
    results["runs"] = {}
    results["ratios"] = dict.fromkeys(results["ratios"])
    assert "cifarlab bench" in bench.table(results) and bench.check_targets(results)["met"] == {}


@pytest.mark.slow
def test_a_cpu_training_epoch_reuses_its_memory_instead_of_faulting_it_in(tmp_path):
    """train.py on a CPU fixes glibc's malloc thresholds (train.reuse_freed_memory): without, its epochs got
    every step's activations and gradients from fresh pages (with CIFARLAB_MALLOPT=0: ~460 minor page faults a
    step on synthetic data, ~8,500 on CIFAR-10, against 16 for the whole epoch with it, on the AMD EPYC)."""
    _, results = _make_bench(
        tmp_path,
        *("--skip", "reference", "plain", "--images", "1024", "--repeats", "1"),
        *("--batch-size", "64", "--precision", "32", "--set", "data.augment=false"),  # the course's setting
    )
    epoch = results["runs"]["train"]["repeats"][0]
    steps = epoch["images"] // 64
    assert epoch["minor_page_faults"] is not None and epoch["minor_page_faults"] < 25 * steps, epoch


def test_reuse_freed_memory_sets_glibcs_thresholds_unless_told_not_to(monkeypatch):
    import cifarlab.train as T

    monkeypatch.setenv("CIFARLAB_MALLOPT", "0")
    assert T.reuse_freed_memory() is False
    monkeypatch.delenv("CIFARLAB_MALLOPT")
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert T.reuse_freed_memory() is True  # glibc accepted both thresholds


def test_cpu_evaluation_in_large_batches_reuses_its_memory(tmp_path):
    """An evaluation batch of 1,000 allocates blocks of ~131 MB (the first conv's output, fp32), above any mmap
    threshold glibc allows: each batch mapped and faulted them in afresh (~64,000 page faults a batch, 4,900
    against 8,300 images/s) until reuse_freed_memory also turned mmap off."""
    script = """
import resource, torch
from cifarlab.model import CifarCNN
from cifarlab.step import EvalStep
from cifarlab.train import reuse_freed_memory
reuse_freed_memory()
net = CifarCNN(10).to(memory_format=torch.channels_last).eval()
x, y = torch.randn(1000, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.zeros(1000).long()
step = EvalStep(net)
with torch.inference_mode():
    for _ in range(4):  # the heap grows to its peak over the first batches (by 8 - 80 MB at a time)
        step(x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step(x, y)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults = int(proc.stdout.split()[-1])
    # glibc's defaults (CIFARLAB_MALLOPT=0): 180,000 - 192,000
    assert faults < 10_000, f"{faults} minor page faults in 3 evaluation batches of 1,000"
