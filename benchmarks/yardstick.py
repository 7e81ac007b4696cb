"""The demo's yardstick: what a user would write instead of the workflow.

The feature extractions, study trials and member trainings of a finished DAG in WORKDIR, one
after another in ONE plain Keras process: no Snakemake, no MLflow, no Optuna, no job start-ups,
each dataset's feature files read once. It replays what the DAG did, read from its results:

- every (dataset, fold, backbone) with members under ``results/members``: its feature maps (same
  backbone, input size, weights and augmented views; written to a temp folder, as a user's script
  would keep them), from the DAG's image cache and split;
- every trial of its study (``results/tune/.../trials.csv``) with the trial's parameters and the
  study's seed, for ``tune.epochs`` epochs; a trial the DAG pruned stops after the epochs it ran;
- every member with the hyperparameters and seed of its ``run.json``, then its val/test
  predictions and its saved ``.keras`` model, as a member job does.

TensorFlow keeps its own thread count (every core): that is what a plain script gets. The
process ends by printing one JSON line (``YARDSTICK {...}``): wall and CPU seconds of each phase,
the counts, and how many members stopped at the same best epoch as in the DAG and the epochs the
members trained here and there (the check that the same work was done: TensorFlow's thread count
moves the last bits of a float sum, so a member may stop an epoch or two apart). ``benchmarks/bench_demo.py`` runs it after the DAG and prints the ratio.

    .venv/bin/python benchmarks/yardstick.py WORKDIR [--configfile FILE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROCESS_T0 = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = "results"


class _Stop(Exception):
    """Ends a replayed trial at the epoch the DAG's pruner stopped it."""


def _typed(value: str) -> Any:
    """A trials.csv cell as the number or string Optuna stored."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def plan(workdir: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """{(dataset, fold, backbone): {"members": [run records], "trials": [trials.csv rows]}} of the finished DAG."""
    groups: dict[tuple[str, int, str], dict[str, Any]] = defaultdict(lambda: {"members": [], "trials": []})
    for path in sorted((workdir / RESULTS / "members").glob("*/fold*/*/seed*/run.json")):
        record = json.loads(path.read_text())
        record["history_csv"] = path.parent / "history.csv"
        groups[(record["dataset"], int(record["fold"]), record["backbone"])]["members"].append(record)
    if not groups:
        raise SystemExit(f"{workdir} has no finished members under {RESULTS}/members: run the DAG there first")
    for (dataset, fold, backbone), group in groups.items():
        trials = workdir / RESULTS / "tune" / dataset / f"fold{fold}" / backbone / "trials.csv"
        if trials.is_file():
            with trials.open(newline="") as fh:
                group["trials"] = [row for row in csv.DictReader(fh) if row["state"] in ("COMPLETE", "PRUNED")]
    return dict(groups)


class Clock:
    """Wall and CPU seconds per phase, and counts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] += time.perf_counter() - t0
        self.cpu[name] += time.process_time() - c0


def extract(workdir: Path, key: tuple[str, int, str], hp: dict[str, Any], out: Path, runtime: Any) -> dict[str, str]:
    """The group's feature files (head mode) in ``out``, from the DAG's image cache and split; the data paths."""
    from allfuse.features import FeatureJob, extract_dataset_features
    from allfuse.settings import FeatureSettings

    dataset, fold, _ = key
    data_dir = workdir / RESULTS / "data" / dataset
    paths = {"manifest": str(data_dir / "manifest.csv"), "images": str(data_dir / "images.npy")}
    if hp["mode"] != "head":
        return paths
    out.mkdir(parents=True)
    outputs = {s: str(out / f"{s}.npz") for s in ("train", "val", "test")}
    settings = FeatureSettings.from_params({k: hp[k] for k in ("backbone", "weights", "input_size", "augment_views")})
    extract_dataset_features(FeatureJob(paths["manifest"], paths["images"], split_of(workdir, dataset), fold, settings,
                                        outputs, runtime))  # fmt: skip
    return {**paths, **outputs}


def split_of(workdir: Path, dataset: str) -> str:
    return str(workdir / RESULTS / "splits" / f"{dataset}.json")


def replay_trials(data: Any, hp: dict[str, Any], trials: list[dict[str, str]], epochs: int, seed: int) -> None:
    """Each trial's model, with its parameters, for the epochs it ran (a pruned one stops there)."""
    from allfuse.settings import HybridSettings

    for row in trials:
        params = {k[len("params_") :]: _typed(v) for k, v in row.items() if k.startswith("params_") and v}
        settings = HybridSettings.from_params({**hp, **params, "epochs": epochs})
        stop_after = int(row["epochs"]) if row["state"] == "PRUNED" else epochs

        def stop_at(epoch: int, logs: dict[str, float], stop_after: int = stop_after) -> None:
            if epoch >= stop_after:
                raise _Stop

        try:
            data.fit(settings, seed, epochs=epochs, on_epoch_end=stop_at)
        except _Stop:
            pass


def replay_members(data: Any, members: list[dict[str, Any]], out: Path) -> tuple[int, int, int]:
    """Each member trained, predicted and saved as its job does: (members that stopped at the DAG's
    best epoch, epochs trained here, epochs the DAG's members trained)."""
    from allfuse.members import prediction_rows
    from allfuse.settings import HybridSettings

    same = epochs = dag_epochs = 0
    for record in members:
        result = data.fit(HybridSettings.from_params(record["hyperparameters"]), int(record["seed"]))
        prediction_rows(data, result.model)
        result.model.save(out / f"seed{record['seed']}.keras")
        same += int(result.best_epoch) == int(record["best_epoch"])
        epochs += len(result.history)
        with open(record["history_csv"], newline="") as fh:
            dag_epochs += sum(1 for _ in csv.DictReader(fh))
    return same, epochs, dag_epochs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a folder the demo DAG finished in")
    p.add_argument("--configfile", action="append", default=[], help="config files of the run (default: config.yaml)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()

    from allfuse.config import load_config_files
    from allfuse.session import Runtime, compute_session
    from allfuse.training_data import load_training_data

    config = load_config_files(args.configfile or [workdir / "config.yaml"])
    groups = plan(workdir)
    clock, same = Clock(), 0
    deterministic = bool(next(iter(groups.values()))["members"][0]["deterministic"])
    with tempfile.TemporaryDirectory(prefix="allfuse_yardstick_") as tmp:
        runtime = Runtime(gpu_locks=Path(tmp) / "locks", threads=None, deterministic=deterministic)
        clock.seconds["start-up"] += time.perf_counter() - PROCESS_T0  # the interpreter and this script's imports
        with clock.phase("start-up"), compute_session(runtime):
            pass  # Keras and TensorFlow imported and set up
        for key, group in groups.items():
            hp, out = group["members"][0]["hyperparameters"], Path(tmp).joinpath(key[0], f"fold{key[1]}", key[2])
            with clock.phase("features"):
                paths = extract(workdir, key, hp, out, runtime)
            clock.counts["features"] += hp["mode"] == "head"
            with compute_session(runtime):
                data = load_training_data(hp["mode"], paths, split_of(workdir, key[0]), key[1])
                with clock.phase("trials"):
                    replay_trials(data, hp, group["trials"], int(config["tune"]["epochs"]), int(config["tune"]["seed"]))
                out.mkdir(parents=True, exist_ok=True)
                with clock.phase("members"):
                    found = replay_members(data, group["members"], out)
                same += found[0]
                clock.counts["member epochs"] += found[1]
                clock.counts["member epochs in the DAG"] += found[2]
            clock.counts["trials"] += len(group["trials"])
            clock.counts["members"] += len(group["members"])
    report = {"wall_s": round(time.perf_counter() - PROCESS_T0, 2), "cpu_s": round(time.process_time(), 2),
              "seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
              "cpu_seconds": {k: round(v, 2) for k, v in clock.cpu.items()},
              "counts": dict(clock.counts), "same_best_epoch": same}  # fmt: skip
    print("YARDSTICK " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
