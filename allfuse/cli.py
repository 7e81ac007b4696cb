"""The ``allfuse`` console script: demo archives and archive inspection outside the workflow.

    allfuse make-demo-archives OUT_DIR [--seed N] [--format zip|tar|tar.gz|dir]
    allfuse inspect ARCHIVE [--max-pixels N] [--which ALL_IDB1|ALL_IDB2 | --labelled NAME]
    allfuse predict INPUT... --model URI [--out predictions.csv] [--tracking-uri URI]
    allfuse fetch-weights [--configfile FILE ...] [--directory DIR] [--source URL|DIR]
    allfuse --version

Any ``AllfuseError`` is printed as one ``allfuse: error: ...`` message (with every problem listed)
and exits 1; argument errors exit 2. Heavy modules are imported inside the commands so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from allfuse import __version__
from allfuse.config import load_schema
from allfuse.errors import AllfuseError, DataError
from allfuse.settings import ARCHIVES


def _default_max_pixels() -> int:
    """The schema's default of data.max_pixels, so the CLI and the workflow refuse the same images."""
    return int(load_schema()["properties"]["data"]["properties"]["max_pixels"]["default"])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allfuse",
        description="Hybrid CNN-GRU leukaemia detection on ALL-IDB: data tools (the experiments run through Snakemake).",
    )
    parser.add_argument("--version", action="version", version=f"allfuse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "make-demo-archives",
        help="write synthetic ALL_IDB1 and ALL_IDB2 archives in the official layout",
        description="Write synthetic ALL_IDB1 and ALL_IDB2 archives (marked synthetic) and the crop-to-slide groups.",
    )
    demo.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the archives into")
    demo.add_argument("--seed", type=int, default=None, help="generator seed (default: the generator's own)")
    demo.add_argument(
        "--format",
        dest="fmt",
        choices=("zip", "tar", "tar.gz", "dir"),
        default="zip",
        help="archive format: zip (default), tar (written gzip-compressed, as tar.gz) or dir (extracted folders)",
    )
    demo.set_defaults(func=_make_demo_archives)

    inspect = commands.add_parser(
        "inspect",
        help="validate an ALL-IDB archive and summarise it",
        description=(
            "Validate an ALL-IDB archive (.zip, .tar, .tar.gz or folder) and summarise it: images per class, "
            "sizes, identical images, warnings. Exits 1 and lists every problem when it is unusable."
        ),
    )
    inspect.add_argument("archive", metavar="ARCHIVE", type=Path, help="archive file or extracted folder")
    inspect.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help="refuse images with more pixels (default: config default)",
    )
    inspect.add_argument(
        "--which", choices=ARCHIVES, action="append", help="dataset to check (repeatable; default: every one present)"
    )
    inspect.add_argument(
        "--labelled", metavar="NAME",
        help="ARCHIVE is a labelled set named NAME (config key data.labelled.NAME): a folder with blast/ and "
             "healthy/ subfolders of images, or a .csv file with the columns path,label",
    )  # fmt: skip
    inspect.set_defaults(func=_inspect)
    _add_predict(commands)
    _add_fetch_weights(commands)
    return parser


def _add_predict(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="apply a packaged allfuse predictor to images",
        description=(
            "Predict images with a packaged fused ensemble (rule package_model): one row per image with p_all, the "
            "predicted label (1 ALL, 0 healthy), predictive entropy and mutual information (nats), whether it is "
            "referred to an expert, and the model version. Unreadable images are listed and the others predicted; "
            "the exit status is then 1."
        ),
    )
    predict.add_argument("inputs", metavar="INPUT", nargs="+", type=Path,
                         help="image files (JPEG, TIFF, PNG, BMP), folders of them, or ALL-IDB archives/folders")  # fmt: skip
    predict.add_argument("--model", required=True, metavar="URI",
                         help="models:/allfuse-<dataset>/<version|latest>, runs:/<run id>/model, or a model folder "
                              "(e.g. results/models/ALL_IDB2/model)")  # fmt: skip
    predict.add_argument("--out", metavar="CSV", help="write the predictions here (default: standard output)")
    predict.add_argument("--tracking-uri", metavar="URI",
                         help="tracking store of models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI, else "
                              "sqlite:///results/mlflow/mlflow.db)")  # fmt: skip
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_predict)


def _add_fetch_weights(commands: Any) -> None:
    fetch = commands.add_parser(
        "fetch-weights",
        help="put the ImageNet weights the config needs into the Keras cache the jobs read",
        description=(
            "Put every ImageNet weights file the config needs (backbones with weights: imagenet) into the Keras cache "
            "the workflow's jobs read ($KERAS_HOME/models, else .keras/models in the working directory), checked "
            "against Keras' own hashes; one line per file; files already there and intact are left alone. Run it "
            "where downloads work (a login node) before the jobs run where they do not."
        ),
    )
    fetch.add_argument("--configfile", type=Path, action="append", default=[],
                       help="config file merged over DIR/config.yaml, as for snakemake (repeatable)")  # fmt: skip
    fetch.add_argument("--directory", type=Path, default=Path("."),
                       help="the workflow's working directory (default: the current one)")  # fmt: skip
    fetch.add_argument("--source", default=None,
                       help="where the files are: a base URL (http, https, file) or a folder holding them by name "
                            "(default: Keras' own URLs)")  # fmt: skip
    fetch.set_defaults(func=_fetch_weights)


def _make_demo_archives(args: argparse.Namespace) -> int:
    from allfuse.synthetic import DemoSpec, make_demo_archives

    spec = DemoSpec() if args.seed is None else DemoSpec(seed=args.seed)
    paths = make_demo_archives(args.out_dir, spec, "tar.gz" if args.fmt == "tar" else args.fmt)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from allfuse.ingest import scan_all, summarise
    from allfuse.labelled import scan_labelled

    max_pixels = args.max_pixels if args.max_pixels is not None else _default_max_pixels()
    if args.labelled:
        scans, what = [scan_labelled(args.archive, args.labelled, max_pixels)], "labelled set"
    else:
        scans, what = scan_all(args.archive, max_pixels, which=args.which), "ALL-IDB archive"
    print("\n\n".join(summarise(scan) for scan in scans))
    problems = [p for scan in scans for p in scan.problems]
    if problems:
        raise DataError(f"{args.archive} is not a usable {what}: {len(problems)} problem(s)", problems=problems)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import contextlib
    import os

    from allfuse import inference

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, not errors
    model, spec = inference.load_model(args.model, inference.tracking_uri(args.tracking_uri))
    with contextlib.ExitStack() as stack:
        images = inference.gather(args.inputs, stack, spec.max_pixels)
        if not images:
            raise DataError(f"no images in {' '.join(map(str, args.inputs))}: give image files, folders or archives")
        rows = inference.predict_images(model, images, progress=not args.quiet)
    inference.write_rows(rows, args.out)
    sys.stdout.flush()
    failed = [r for r in rows if r["error"]]
    if failed:
        print(f"allfuse predict: {len(failed)} image(s) could not be read:", file=sys.stderr)
        for row in failed:
            print(f"  - {row['image_id']}: {row['error']}", file=sys.stderr)
    print(f"allfuse predict: {inference.summary(rows, spec.model_version or args.model)}", file=sys.stderr)
    return 1 if failed else 0


def _fetch_weights(args: argparse.Namespace) -> int:
    from allfuse.config import load_config_files
    from allfuse.session import keras_home_for
    from allfuse.settings import from_config
    from allfuse.weights import fetch_weights, needed_weights

    base = args.directory / "config.yaml"
    config = load_config_files(([base] if base.is_file() else []) + list(args.configfile))
    wanted = needed_weights(from_config(config))
    if not wanted:
        print("the config needs no ImageNet weights (no backbone has weights: imagenet)")
        return 0
    fetch_weights(wanted, keras_home_for(args.directory) / "models", args.source)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argument errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except AllfuseError as exc:
        sys.stdout.flush()
        print(f"allfuse: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
