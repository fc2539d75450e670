"""Edge cases of the course lab a student hits: hyperparameters that turn training into NaN, lab-command
arguments that used to end in a traceback (or silently in NaN), and the CNN at too small image sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cifarlab.model import CifarCNN, parameter_groups
from cifarlab.optim import AdaGrad, Adam, RMSProp


# ---- optimizers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [AdaGrad, RMSProp, Adam])
def test_eps_zero_is_rejected_because_a_zero_gradient_gives_nan(cls) -> None:
    """With ε = 0 an element whose gradient is 0 (a dead ReLU, an unused class) gets 0/√0 = NaN, and the NaN
    spreads through the whole network at the next step (``optimizer.eps=0`` ended in "training diverged")."""
    with pytest.raises(ValueError, match=r"eps=0\.0.*allowed"):
        cls([nn.Parameter(torch.zeros(2))], eps=0.0)
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = cls([p], eps=1e-12, lr=0.1)  # any ε > 0 keeps the zero-gradient element finite
    p.grad = torch.tensor([0.0, 1.0])
    opt.step()
    assert torch.isfinite(p).all() and p[0].item() == 1.0


def test_adam_follows_a_scheduler_and_skips_params_without_grads_like_torch() -> None:
    """The learning rate is read from param_groups at every step (StepLR changes it mid-run), per-group weight
    decay applies to weights only, and a parameter left without a gradient on some steps is skipped, all as
    torch.optim.Adam does."""
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(32, 5, generator=g, dtype=torch.float64),
        torch.randn(32, 3, generator=g, dtype=torch.float64),
    )

    def run(make_opt) -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        opt = make_opt(parameter_groups(net, 0.05))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.3)
        for i in range(200):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            if i % 7 == 0:
                net[2].bias.grad = None
            opt.step()
            sched.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    ours = run(lambda groups: Adam(groups, lr=0.01))
    theirs = run(lambda groups: torch.optim.Adam(groups, lr=0.01))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


# ---- model -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 4, 7])
def test_cnn_rejects_images_smaller_than_its_three_poolings(size: int) -> None:
    with pytest.raises(ValueError, match=rf"image_size={size}\b.*allowed"):
        CifarCNN(image_size=size)


@pytest.mark.parametrize("size", [8, 20, 36])
def test_cnn_any_image_size_from_8_trains_a_step(size: int) -> None:
    torch.manual_seed(0)
    net = CifarCNN(num_classes=5, dropout=0.0, image_size=size)
    opt = torch.optim.SGD(parameter_groups(net, 1e-4), lr=0.01)
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


# ---- python -m cifarlab.course ... -------------------------------------------------------------------------
BAD_ARGS = [
    (["gradients", "--lr", "-1", "--steps", "1", "--image-size", "8"], "--lr"),
    (["gradients", "--lr", "nan", "--steps", "1", "--image-size", "8"], "--lr"),
    (["gradients", "--momentum", "1.0", "--steps", "1", "--image-size", "8"], "--momentum"),
    (["gradients", "--batch-size", "0", "--steps", "1", "--image-size", "8"], "--batch-size"),
    (["gradients", "--image-size", "0", "--steps", "1"], "--image-size"),
    (["init-variance", "--n-out", "0", "--max-n-in", "10"], "--n-out"),
    (["init-variance", "--max-n-in", "0"], "--max-n-in"),
    (["init-variance", "--batch", "1", "--max-n-in", "10"], "--batch"),
]


@pytest.mark.parametrize("args, flag", BAD_ARGS, ids=[" ".join(a[:3]) for a, _ in BAD_ARGS])
def test_lab_commands_reject_bad_values_before_any_work(args, flag, tmp_path: Path, capsys) -> None:
    from cifarlab.course.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(out)])
    assert exc.value.code == 2  # argparse's convention, as for the existing --image-size/--steps checks
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m cifarlab.course: error:") and flag in err[-1], err
    assert not out.exists()


def test_lab_commands_reject_an_out_path_that_is_a_file(tmp_path: Path, capsys) -> None:
    from cifarlab.course.cli import main

    afile = tmp_path / "figs"
    afile.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["init-variance", "--max-n-in", "10", "--out", str(afile)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err.strip().splitlines()[-1]


def test_race_without_a_sweep_is_one_line_on_stderr(tmp_path: Path, capsys) -> None:
    from cifarlab.course.cli import main

    assert main(["race", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and "trials.csv not found" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
