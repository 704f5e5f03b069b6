"""The ``normlab`` command (also ``python -m normlab``).

Each subcommand is a pair: ``_add_NAME(subparsers)`` declares its arguments and
``_run_NAME(args)`` runs it, importing what it needs only then, so ``normlab --help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys

from normlab import __version__


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the normalization layers create_norm knows")
    p.set_defaults(run=_run_list)


def _run_list(args) -> int:
    from normlab.registry import get_norm_spec, list_norms

    for spec in map(get_norm_spec, list_norms()):
        aliases = ", ".join(spec.aliases)
        suffix = f"  [aliases: {aliases}]" if aliases else ""
        print(f"{spec.name:16s} {spec.description}{suffix}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small CNN on real digits with several norms and batch sizes (<1 min)",
        description="A short, real comparison of normalization layers: a small CNN on "
        "scikit-learn's 8x8 handwritten digits, trained with each norm at a small and "
        "a normal batch size for the same number of epochs, reporting test accuracy.",
    )
    p.add_argument("--norms", nargs="+", default=["none", "bn", "gn", "ln"],
                   help="normalization names (see `normlab list`)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 32])
    p.add_argument("--epochs", type=int, default=4, help="epochs per run")
    p.add_argument("--lr", type=float, default=0.05,
                   help="learning rate at batch size 32, scaled linearly with the batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from normlab.demo import run_demo

    run_demo(norms=args.norms, batch_sizes=args.batch_sizes, epochs=args.epochs, lr=args.lr,
             seed=args.seed, json_path=args.json)
    return 0


#: ``normlab train``'s exit status when the run diverged (a non-finite or exploding loss
#: or gradient): the result is still printed and written, but scripts see the failure.
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _ArgumentError(ValueError):
    """A bad command-line argument; the message names it."""


def _check_writable_folder(flag: str, folder: str) -> None:
    """Create and remove a file in ``folder``: the one test that a write will work
    (os.access says yes to root on a read-only mount)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise _ArgumentError(f"{flag}: cannot write into folder {folder!r} "
                             f"({e.strerror or e})") from None


def _check_output_file(flag: str, path: str | None) -> None:
    """``path`` can be written: not a folder, in an existing, writable folder. Checked
    before training, so that a finished run's result is never lost to a bad path."""
    import os

    if path is None:
        return
    if os.path.isdir(path):
        raise _ArgumentError(f"{flag}: {path!r} is a folder; give a file path")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise _ArgumentError(f"{flag}: folder {folder!r} (of {path!r}) does not exist")
    _check_writable_folder(flag, folder)


def _parse_kv(items: list[str] | None) -> dict:
    """``["num_groups=4", "eps=1e-3", "affine=false"]`` -> a dict of Python values."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise _ArgumentError(f"--norm-kw: expected KEY=VALUE, got {item!r}")
        low = text.strip().lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        out[key.strip().replace("-", "_")] = value
    return out


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one model on one dataset with one norm and print the result",
        description="Train one model (mlp, cnn, resnet, lstm) built with a normalization "
        "layer on a dataset (embedded: mnist5k, digits, mnist1d; or your own cifar10 / mnist "
        "folder with --data-dir), then print test accuracy, loss and speed.",
        epilog="Exit status: 0 when the run finished, 2 for a bad argument (checked before "
        f"training starts, output paths included), {EXIT_DIVERGED} when the run diverged "
        "(the result is still printed and written).",
    )
    p.add_argument("--data", default="mnist5k",
                   help="mnist5k, digits, mnist1d, or cifar10 / mnist with --data-dir")
    p.add_argument("--data-dir", default=None, help="folder of your CIFAR-10 or MNIST files")
    p.add_argument("--data-seed", type=int, default=0,
                   help="train/test split (mnist5k, digits) or generator seed (mnist1d)")
    p.add_argument("--model", default="cnn", help="mlp, cnn, resnet or lstm")
    p.add_argument("--norm", default="bn", help="normalization name (see `normlab list`)")
    p.add_argument("--norm-kw", nargs="*", metavar="KEY=VALUE",
                   help="keywords for the norm layers, e.g. num_groups=4 eps=1e-3")
    p.add_argument("--width", type=int, default=None, help="model width (default: per model)")
    p.add_argument("--depth", type=int, default=None, help="model depth (default: per model)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="multiply the hidden layers' initial weights by this")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per step and per process: under torchrun the global batch "
                   "is batch-size x the number of processes")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: steps/10)")
    p.add_argument("--seed", type=int, default=0, help="model init, batches and dropout")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small models run fastest on "
                   "one thread per run; 0 keeps torch's default)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full result here")
    p.add_argument("--save", default=None, metavar="PATH",
                   help="write the trained model's state_dict here (torch.save)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun, make batch statistics global over the processes "
                   "with normlab.nn.to_sync_batchnorm (default); --no-sync-bn keeps them "
                   "per process")
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others in a "
                   "collective (a rank that skipped a SyncBatchNorm call, or died) before "
                   "it fails with an error; default %(default)s")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


# (flag, attribute, check keywords): the numeric arguments of `normlab train`, checked
# before any data is loaded (a negative --clip would train with the gradient reversed).
_TRAIN_NUMBERS = [
    ("--batch-size", "batch_size", {"integer": True, "low": 1}),
    ("--steps", "steps", {"integer": True, "low": 1}),
    ("--warmup", "warmup", {"integer": True, "low": 0}),
    ("--eval-every", "eval_every", {"integer": True, "low": 1, "allow_none": True}),
    ("--threads", "threads", {"integer": True, "low": 0}),
    ("--width", "width", {"integer": True, "low": 1, "allow_none": True}),
    ("--depth", "depth", {"integer": True, "low": 1, "allow_none": True}),
    ("--lr", "lr", {"low": 0.0}),
    ("--momentum", "momentum", {"low": 0.0, "high": 1.0, "high_open": True}),
    ("--weight-decay", "weight_decay", {"low": 0.0}),
    ("--clip", "clip", {"low": 0.0, "low_open": True, "allow_none": True}),
    ("--dropout", "dropout", {"low": 0.0, "high": 1.0, "high_open": True}),
    ("--init-scale", "init_scale", {"low": 0.0, "low_open": True}),
    ("--dist-timeout", "dist_timeout", {"low": 0.0, "low_open": True}),
]


def _check_train_args(args):
    """Every argument of `normlab train` that can be checked without training, in
    order; returns the torch.device. Raises _ArgumentError naming the argument."""
    import torch

    from normlab.nn.checks import check_int, check_number

    for flag, attr, kw in _TRAIN_NUMBERS:
        kw = dict(kw)
        try:
            if kw.pop("integer", False):
                check_int("normlab train", flag, getattr(args, attr), **kw)
            else:
                check_number("normlab train", flag, getattr(args, attr), **kw)
        except (TypeError, ValueError) as e:
            # None stands for "not given" on the command line.
            msg = str(e).removeprefix("normlab train: ").replace(" or None", " (or omitted)")
            raise _ArgumentError(msg) from None
    _parse_kv(args.norm_kw)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise _ArgumentError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _ArgumentError(f"--device {args.device}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise _ArgumentError(f"--device {args.device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise _ArgumentError(f"--device {args.device}: MPS is not available on this machine")
    _check_output_file("--json", args.json)
    _check_output_file("--save", args.save)
    return device


def _build_model(args, say):
    """The dataset and the model, or None after one line naming what was wrong."""
    import torch

    from normlab import data, models

    kw = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    try:
        ds = data.load(args.data, seed=args.data_seed, root=args.data_dir)
        torch.manual_seed(args.seed)
        model = models.build(args.model, ds.in_shape, ds.num_classes, norm=args.norm,
                             dropout=args.dropout, init_scale=args.init_scale, **kw,
                             **_parse_kv(args.norm_kw))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        # A keyword the norm does not take, or a bad value for one, reaches its
        # constructor: say which argument it came from.
        keys = _parse_kv(args.norm_kw)
        where = "--norm-kw: " if any(f"{k} " in str(e) or f"'{k}'" in str(e)
                                     for k in keys) else ""
        say(f"normlab train: error: {where}{e}", file=sys.stderr)
        return None, None, kw
    return ds, model, kw


def _run_train(args) -> int:
    import torch

    from normlab import distributed
    from normlab.train import train

    # Under torchrun every process runs this (normlab.distributed says how).
    ddp_env = distributed.torchrun_env()
    rank, world, _ = ddp_env or (0, 1, 0)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        _check_train_args(args)
    except _ArgumentError as e:
        say(f"normlab train: error: {e}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = distributed.process_device(args.device, ddp_env)
    ds, model, kw = _build_model(args, say)
    if model is None:
        return 2
    shape = "x".join(str(s) for s in ds.in_shape)
    batch = f"batch {args.batch_size}"
    config = {"data": ds.name, "data_seed": args.data_seed, "model": args.model,
              "norm": args.norm, "norm_kwargs": _parse_kv(args.norm_kw), **kw,
              "dropout": args.dropout, "init_scale": args.init_scale}
    if ddp_env:
        batch = (f"batch {args.batch_size} per process x {world} processes "
                 f"(DDP{', SyncBatchNorm' if args.sync_bn else ''})")
        config.update(sync_bn=args.sync_bn, global_batch_size=args.batch_size * world)
    say(f"normlab train: {args.model} (norm={args.norm}) on {ds.name} "
        f"({ds.num_train} train / {ds.num_test} test, {shape}), {batch}, "
        f"lr {args.lr}, {args.steps} steps, seed {args.seed}", flush=True)

    def run(net):
        return train(
            net, ds, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, optimizer=args.optimizer,
            schedule=args.schedule, warmup_steps=args.warmup, clip_grad_norm=args.clip,
            seed=args.seed, eval_every=args.eval_every, device=device,
            progress=False if args.no_progress else None,
            desc=f"{args.model}/{args.norm}", rank=rank, world_size=world, config=config,
        )

    if ddp_env:
        model, result = distributed.train_data_parallel(model, device, world, args.sync_bn,
                                                        run, timeout_s=args.dist_timeout)
    else:
        result = run(model)
    if rank != 0:
        return EXIT_DIVERGED if result.diverged else 0
    return _report_train(args, result, model)


def _report_train(args, r, model) -> int:
    """Print the result, write --json and --save; the exit status."""
    import torch

    print(f"parameters {r.num_params:,}")
    if r.diverged:
        print(f"DIVERGED at step {r.diverged_step}: {r.diverged_reason}")
    if r.final_test_acc is not None:
        print(f"test accuracy {r.final_test_acc:.4f}  test loss {r.final_test_loss:.4f}  "
              f"(best {r.best_test_acc:.4f})")
    if r.final_train_loss is not None:
        print(f"train loss {r.final_train_loss:.4f} (mean over the last 10% of steps)")
    print(f"wall time {r.wall_time_s:.1f} s (training {r.train_time_s:.1f} s, "
          f"{r.steps_per_s:.1f} steps/s, {r.samples_per_s:.0f} samples/s), "
          f"{r.steps_done}/{r.steps} steps")
    if args.json:
        r.to_json(args.json)
        print(f"result written to {args.json}")
    if args.save:
        torch.save(model.state_dict(), args.save)
        print(f"state_dict written to {args.save}")
    if r.diverged:
        print(f"normlab train: the run diverged (exit status {EXIT_DIVERGED})", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study",
        help="re-run the papers' claims and a normalizer x batch x lr grid; write a report",
        description="The main job: run every claim of the lab (each a small experiment "
        "with a criterion written before the run and a verdict) and a comparison grid "
        "(normalizers x batch sizes 2-128 x learning rates, a small CNN), over worker "
        "processes, then write DIR/index.html, DIR/README.md, DIR/claims.json and PNG plots. "
        "Resumable: every run is stored as JSON; running the same command again redoes only "
        "what is missing and rewrites the report. Budgets on 2 CPU cores: --quick at most "
        "5 minutes, default at most 30, --full as long as it needs.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="budget", const="quick",
                      help="the quick budget: a smoke test with shortened setups and 2 seeds that "
                      "decides no claim (at most 5 minutes)")
    size.add_argument("--full", action="store_const", dest="budget", const="full",
                      help="the full budget: the default's setups over 20 seeds instead of 10")
    p.set_defaults(budget="default")
    p.add_argument("--claims", nargs="+", metavar="ID", default=None,
                   help="only these claims (ids or numbers, see `normlab claims`)")
    p.add_argument("--data", default="digits",
                   help="dataset of the grid and of the claims that let you choose "
                   "(digits, mnist5k, mnist1d; default digits)")
    p.add_argument("--out", default="normlab-study", metavar="DIR",
                   help="study folder (default normlab-study/); an existing one is resumed")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes, one torch thread each (default 2)")
    p.add_argument("--no-grid", action="store_true", help="skip the comparison grid")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the runs go: local worker processes (default) or a Ray "
                   "cluster, one task a run (pip install 'normlab[cluster]')")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where the runs train (default cpu; auto: CUDA if torch sees a GPU)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to join (auto, HOST:PORT); default: start a local "
                   "one with --workers CPUs on 127.0.0.1")
    p.add_argument("--scale", default="small", choices=("small", "paper"),
                   help="small (default): every claim's setup on the embedded datasets; "
                   "paper: the papers' setups (CIFAR ResNets on CIFAR-10 from --data-dir, sized "
                   "for one GPU in hours) for the claims that have one, the others are "
                   "reported as not run at this scale")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="with --scale paper: the folder of CIFAR-10's python batches "
                   "(data_batch_1 .. data_batch_5, test_batch)")
    p.set_defaults(run=_run_study)


def _check_study_args(args) -> None:
    """--out is a folder (or can be made one) that this process can write into, and
    --workers is not negative (0 runs everything in this process): refused in one line
    before any claim runs."""
    import os

    if args.workers < 0:
        raise _ArgumentError(f"--workers must be an int >= 0 (0: no worker processes), "
                             f"got {args.workers}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise _ArgumentError(f"--out: {args.out!r} is a file, not a folder")
    existing = out
    while not os.path.exists(existing):  # the folder the study would create its own in
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise _ArgumentError(f"--out: {existing!r} (in the path {args.out!r}) is a file, "
                             "not a folder")
    _check_writable_folder("--out", existing)


def _run_study(args) -> int:
    import shlex

    from normlab.study import StudyLocked, format_claims_table, run_study

    try:
        _check_study_args(args)
    except _ArgumentError as e:
        print(f"normlab study: error: {e}", file=sys.stderr)
        return 2
    parts = ["normlab", "study"] + ([f"--{args.budget}"] if args.budget != "default" else [])
    if args.scale != "small":
        parts += ["--scale", args.scale]
    if args.data_dir:
        parts += ["--data-dir", args.data_dir]
    if args.claims:
        parts += ["--claims", *args.claims]
    if args.data != "digits":
        parts += ["--data", args.data]
    if args.no_grid:
        parts.append("--no-grid")
    if args.workers != 2:
        parts += ["--workers", str(args.workers)]
    if args.executor != "local":
        parts += ["--executor", args.executor]
    if args.ray_address:
        parts += ["--ray-address", args.ray_address]
    if args.device != "cpu":
        parts += ["--device", args.device]
    parts += ["--out", args.out]
    try:
        summary = run_study(args.out, budget=args.budget, claims=args.claims, data=args.data,
                            workers=args.workers, grid=not args.no_grid,
                            command=" ".join(shlex.quote(x) for x in parts),
                            executor=args.executor, ray_address=args.ray_address,
                            device=args.device, scale=args.scale, data_dir=args.data_dir)
    except StudyLocked as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"normlab study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnormlab study: interrupted; every finished run is stored in {args.out}/, "
              "and the same command again resumes from there", file=sys.stderr)
        return 130
    print()
    print(format_claims_table(summary["claims"]))
    print(f"\nstudy finished in {summary['wall_seconds']:.0f} s "
          f"({summary['runs_done']} runs computed, {summary['runs_reused']} reused)")
    print(f"report: {summary['report']}  (also README.md and claims.json in {args.out})")
    return 0


def _add_claims(sub) -> None:
    p = sub.add_parser(
        "claims", help="list the lab's claims (number, id, title, source, availability)",
        description="List the claims `normlab study` re-runs: number, id (for --claims), "
        "title, source, and whether the layers each one needs are available.")
    p.set_defaults(run=_run_claims)


def _run_claims(args) -> int:
    from normlab.study import discover_claims

    found = discover_claims()
    if not found:
        print("no claims yet")
        return 0
    for f in found:
        c = f.claim
        missing = c.missing_requirements()
        status = "available" if not missing else "not available (missing " \
            + ", ".join(missing) + ")"
        print(f"{c.number:>3}  {c.id:28s} {c.title}")
        print(f"     source: {' '.join(c.source.split())}")
        print(f"     {status}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="rebuild a study's report from its stored results",
        description="Rebuild DIR/index.html, DIR/README.md, DIR/claims.json and the grid's "
        "plots from the JSON results a `normlab study` stored in DIR (nothing is re-run).")
    p.add_argument("dir", metavar="DIR", help="the study folder")
    p.add_argument("--replot", action="store_true",
                   help="also redraw every claim's plots (default: only missing ones)")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from normlab.report import write_report

    try:
        path = write_report(args.dir, replot=args.replot, log=print)
    except FileNotFoundError as e:
        print(f"normlab report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time every normalization layer against its peers (torch.nn, composite, copy)",
        description="Speed and memory of every normlab normalization layer, forward and "
        "forward+backward, train and eval, NCHW and channels_last, float32 and bfloat16, "
        "against torch.nn, the plain composite, Online Norm's per-sample loop and a copy; "
        "median of interleaved repeats. Writes a Markdown table and JSON records.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a short run (under a minute): one shape, 5 repeats")
    p.add_argument("--layers", nargs="+", default=None, help="layer names (default: all)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="NxCxHxW",
                   help="input shapes, e.g. 32x64x32x32 (default: the issue's four)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--layouts", nargs="+", default=None, choices=["nchw", "channels_last"])
    p.add_argument("--modes", nargs="+", default=None, choices=["train", "eval"])
    p.add_argument("--passes", nargs="+", default=None, choices=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu (default with 1 thread: leaves out time other processes hold "
                   "the cores) or wall")
    p.add_argument("--no-comparisons", action="store_true",
                   help="skip the head-to-head comparisons (fused kernels, Online Norm's "
                   "loop, the mixtures against BatchNorm, memory)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as JSON")
    p.add_argument("--md", default=None, metavar="PATH", help="write the Markdown report")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from normlab import bench

    try:
        shapes = [bench.parse_shape(s) for s in args.shapes] if args.shapes else None
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    quick = args.quick
    kw = {
        "layers": args.layers,
        "shapes": shapes or (bench.QUICK_SHAPES if quick else None),
        "dtypes": args.dtypes or ["float32", "bfloat16"],
        "layouts": args.layouts or list(bench.LAYOUTS),
        "modes": args.modes or ["train", "eval"],
        "passes": args.passes or ["fwd", "fwd+bwd"],
        "repeats": args.repeats or (5 if quick else 15),
        "warmup": 1 if quick else 2,
        "threads": args.threads,
        "clock": args.clock,
        "comparisons": not args.no_comparisons,
    }
    try:
        result = bench.run(**kw, progress=lambda s: print(f"normlab bench: {s}", flush=True))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    text = result.to_markdown()
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.json:
        result.to_json(args.json)
        print(f"records written to {args.json}")
    return 0


_COMMANDS = [_add_list, _add_demo, _add_train, _add_study, _add_claims, _add_report, _add_bench]


def _add_docs(sub) -> None:
    p = sub.add_parser(
        "docs",
        help="regenerate docs/choosing.md (choosing a norm) from a study's and a "
        "benchmark's JSON",
        description="Write the guide to choosing a normalization layer: the hand-written "
        "part from normlab.docs, the evidence (claim verdicts, speed ratios) from the JSON "
        "of `normlab study` and `normlab bench`; missing evidence reads 'not measured yet'.",
    )
    p.add_argument("--study", metavar="DIR", default=None,
                   help="a study's output folder (its claims.json) or the claims.json file")
    p.add_argument("--bench", metavar="PATH", default=None,
                   help="the records JSON written by `normlab bench`")
    p.add_argument("--out", metavar="PATH", default="docs/choosing.md",
                   help="where to write the Markdown ('-': print it); default: %(default)s")
    p.set_defaults(run=_run_docs)


def _run_docs(args) -> int:
    from normlab.docs import write

    try:
        text = write(args.out, study=args.study, bench=args.bench)
    except (FileNotFoundError, ValueError) as e:
        print(f"normlab docs: error: {e}", file=sys.stderr)
        return 2
    if args.out in (None, "-"):
        print(text)
    else:
        print(f"normlab docs: wrote {args.out}")
    return 0


_COMMANDS.append(_add_docs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normlab",
        description="normlab: normalization layers for deep networks, and a lab that "
        "re-runs their papers' claims.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
