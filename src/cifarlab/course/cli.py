"""``python -m cifarlab.course <command>``: the course lab's demos.

Commands:
  demos          the lecture's 1-D gradient-descent pictures (x², the quartic; GD, momentum, decay, ...)
  init-variance  output variance of a linear layer under N(0,1), Xavier and He initialisation
  gradients      per-layer gradient norms of the course CNN: sigmoid vs ReLU, default vs He init
  race           the course_optimizers sweep as a table: each course optimizer next to its torch twin
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DEFAULT_OUT = Path("course_figures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cifarlab.course",
        description="The deep-learning course's demos, computed with cifarlab's course optimizers and CNN.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def out_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default: %(default)s)"
        )

    p = sub.add_parser("demos", help="1-D gradient descent: learning rates, local minima, momentum, decay")
    out_arg(p)

    p = sub.add_parser("init-variance", help="output variance of a linear layer under N(0,1)/Xavier/He init")
    out_arg(p)
    p.add_argument("--n-out", type=int, default=100, help="output width of the layer (default: %(default)s)")
    p.add_argument("--max-n-in", type=int, default=10_000, help="largest fan-in (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="inputs per measurement (default: %(default)s)")

    p = sub.add_parser("gradients", help="per-layer gradient norms of the course CNN (vanishing gradients)")
    out_arg(p)
    p.add_argument(
        "--steps", type=int, default=200, help="training steps per configuration (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument(
        "--image-size",
        type=int,
        default=16,
        help="synthetic image side, a multiple of 8 (default: %(default)s, 4x cheaper than CIFAR's 32 and the same "
        "picture; 32 takes about a minute on 2 CPU cores)",
    )
    p.add_argument("--lr", type=float, default=0.01, help="Momentum learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's default (default: %(default)s: small convolutions gain little "
        "from more, and lose a lot when the cores are shared)",
    )
    p = sub.add_parser("race", help="read a course_optimizers sweep: best val/acc and lr per optimizer")
    p.add_argument(
        "sweep_dir",
        type=Path,
        nargs="?",
        default=Path("multirun/course_optimizers"),
        help="the sweep folder (default: %(default)s)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values the labs cannot use before any work, as argparse does: usage, one error line, exit 2.
    (Unchecked, they ended in a traceback from deep inside the lab, or silently in NaN.)"""

    def need(ok: bool, flag: str, value: object, allowed: str) -> None:
        if not ok:
            parser.error(f"{flag}={value} is not allowed; allowed: {allowed}")

    out = getattr(args, "out", None)
    if out is not None:
        need(not out.exists() or out.is_dir(), "--out", out, "a folder (this path is a file)")
    if args.command == "init-variance":
        need(args.n_out >= 1, "--n-out", args.n_out, "an integer >= 1")
        need(args.max_n_in >= 1, "--max-n-in", args.max_n_in, "an integer >= 1")
        need(args.batch >= 2, "--batch", args.batch, "an integer >= 2 (a variance needs two inputs)")
    elif args.command == "gradients":
        size = args.image_size
        need(size >= 8 and size % 8 == 0, "--image-size", size, "a multiple of 8 (three 2x poolings), >= 8")
        need(args.steps >= 1, "--steps", args.steps, "an integer >= 1")
        need(args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1")
        need(math.isfinite(args.lr) and args.lr >= 0, "--lr", args.lr, "a number >= 0")
        need(0 <= args.momentum < 1, "--momentum", args.momentum, "0 <= momentum < 1")
        need(args.threads >= 0, "--threads", args.threads, "an integer >= 0 (0: torch's default)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.command == "demos":
        from cifarlab.course import demos

        demos.main(args.out)
    elif args.command == "init-variance":
        from cifarlab.course import init_variance

        init_variance.main(args.out, n_out=args.n_out, max_n=args.max_n_in, batch=args.batch)
    elif args.command == "race":
        from cifarlab.course import race

        return race.main(args.sweep_dir)
    elif args.command == "gradients":
        from cifarlab.course import gradients

        gradients.main(
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            image_size=args.image_size,
            lr=args.lr,
            momentum=args.momentum,
            seed=args.seed,
            threads=args.threads,
        )
    return 0
