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
    from normlab.registry import _SPECS

    for spec in _SPECS.values():
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


def _parse_kv(items: list[str] | None) -> dict:
    """``["num_groups=4", "eps=1e-3", "affine=false"]`` -> a dict of Python values."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"normlab: expected KEY=VALUE, got {item!r}")
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
    p.add_argument("--batch-size", type=int, default=32)
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    import torch

    from normlab import data, models
    from normlab.train import train

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kw = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    try:
        ds = data.load(args.data, seed=args.data_seed, root=args.data_dir)
        torch.manual_seed(args.seed)
        model = models.build(args.model, ds.in_shape, ds.num_classes, norm=args.norm,
                             dropout=args.dropout, init_scale=args.init_scale, **kw,
                             **_parse_kv(args.norm_kw))
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"normlab train: error: {e}", file=sys.stderr)
        return 2
    shape = "x".join(str(s) for s in ds.in_shape)
    print(f"normlab train: {args.model} (norm={args.norm}) on {ds.name} "
          f"({ds.num_train} train / {ds.num_test} test, {shape}), batch {args.batch_size}, "
          f"lr {args.lr}, {args.steps} steps, seed {args.seed}", flush=True)
    result = train(
        model, ds, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, optimizer=args.optimizer,
        schedule=args.schedule, warmup_steps=args.warmup, clip_grad_norm=args.clip,
        seed=args.seed, eval_every=args.eval_every, device=args.device,
        progress=False if args.no_progress else None,
        desc=f"{args.model}/{args.norm}",
        config={"data": ds.name, "data_seed": args.data_seed, "model": args.model,
                "norm": args.norm, "norm_kwargs": _parse_kv(args.norm_kw), **kw,
                "dropout": args.dropout, "init_scale": args.init_scale},
    )
    r = result
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
        result.to_json(args.json)
        print(f"result written to {args.json}")
    return 0


_COMMANDS = [_add_list, _add_demo, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
