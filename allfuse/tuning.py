"""Bayesian hyperparameter optimisation: one Optuna study per (dataset, backbone), validation only.

``tune`` is what the workflow's ``tune_backbone`` rule calls. A study samples hyperparameters
with TPE (seeded from ``tune.seed``), trains one model per trial on the TRAINING split, scores it
on the VALIDATION split (``tune.objective``) and stops unpromising trials early with a median
pruner fed the per-epoch validation metric. The test split is never loaded: the data layer
(``allfuse.training_data``) is asked for the train and val subsets only. The best trial's
parameters go to ``best_params.json``, which every ensemble member of that backbone reads
(``allfuse.members.resolve_hyperparameters``).

The study file, its resumption after a crash and its staleness are ``allfuse.studies``'; the
search space is parsed once, at start-up (``allfuse.settings.TuneSettings``).

MLflow: the study is a stage run (``allfuse.stages``), reused when the study resumes, with one
child run per trial holding the trial's parameters, every epoch's metrics as steps, its final
state as the tag ``allfuse.trial_state`` (COMPLETE, PRUNED, FAIL) and its duration. The best
trial's run is tagged ``allfuse.best_trial=true``; the best parameters go to the study's run
(params ``best.<name>``, tags ``allfuse.best.<name>``, artifacts ``best_params.json`` and
``trials.csv``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allfuse import studies, tracking
from allfuse import tags as T
from allfuse.errors import AllfuseError, ConfigError
from allfuse.files import read_json, sha256_json, write_csv
from allfuse.session import Runtime, compute_session
from allfuse.settings import HybridSettings, ParamSpec, TuneSettings
from allfuse.stages import SplitFacts, StageContext, StageRun, stage_run
from allfuse.training_data import TrainingData, load_training_data

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]
# trainer(data, settings, seed, *, epochs, on_epoch_end) -> object with .history (list of
# per-epoch dicts with "epoch" and the metrics) and .best_epoch (the epoch whose weights the model
# holds, as in allfuse.training.TrainResult).
Trainer = Callable[..., Any]


@dataclass(frozen=True)
class TuneJob:
    """Everything one study needs, as values and paths (no Snakemake objects).

    base: the hybrid settings the study depends on (``HybridSettings.study_view``: all but the
    tuned keys, which each trial draws, and ``epochs``, which is ``tune.epochs``).
    data: head mode {"train", "val"} feature files; finetune mode {"manifest", "images"}. Any
    other key (a "test" file) is ignored. study_db: default ``study.db`` next to ``out_best``.
    enqueue: parameter sets evaluated first when the study is new (e.g. known good settings).
    """

    dataset: str
    backbone: str
    base: Mapping[str, Any]
    tune: TuneSettings
    data: Mapping[str, str]
    split: str
    out_best: str
    out_trials: str
    runtime: Runtime
    context: StageContext
    study_db: str | None = None
    fold: int = 0
    enqueue: Sequence[Mapping[str, Any]] = field(default_factory=tuple)

    @property
    def db_path(self) -> Path:
        return Path(self.study_db) if self.study_db else Path(self.out_best).parent / "study.db"

    @property
    def name(self) -> str:
        return f"{self.dataset}-fold{self.fold}-{self.backbone}"

    def trial_settings(self, params: Mapping[str, Any]) -> HybridSettings:
        """A trial's hybrid settings: the study's base, the trial's values, the tuning epochs."""
        return HybridSettings.from_params({**self.base, **params, "epochs": self.tune.epochs})


def suggest(trial: optuna.trial.BaseTrial, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Ask the trial for one value per spec; returns {name: value} with plain Python types."""
    params: dict[str, Any] = {}
    for spec in specs:
        if spec.kind == "categorical":
            params[spec.name] = trial.suggest_categorical(spec.name, list(spec.choices))
        elif spec.kind == "int":
            low, high, step = int(spec.low), int(spec.high), int(spec.step or 1)  # type: ignore[arg-type]
            params[spec.name] = int(trial.suggest_int(spec.name, low, high, step=step, log=spec.log))
        else:
            low_f, high_f = float(spec.low), float(spec.high)  # type: ignore[arg-type]
            params[spec.name] = float(trial.suggest_float(spec.name, low_f, high_f, step=spec.step, log=spec.log))
    return params


def study_identity(tune: TuneSettings, base: Mapping[str, Any], data_digest: str = "") -> dict[str, Any]:
    """Everything that makes a study's trials comparable, as plain JSON values: the tune settings
    without the budget (a budget change tops up instead of restarting), the parsed search space,
    the study's base hybrid settings (tuned keys left out) and the digest of the training and
    validation data."""
    tuned = set(tune.tuned)
    return {"tune": tune.identity(), "settings": {k: v for k, v in base.items() if k not in tuned}, "data": data_digest}


def study_hash(tune: TuneSettings, base: Mapping[str, Any], data_digest: str = "") -> str:
    """sha256 of ``study_identity``: equal hashes mean trials of one study may be pooled."""
    return sha256_json(study_identity(tune, base, data_digest))


def fit_trial(data: TrainingData, settings: HybridSettings, seed: int, *, epochs: int, on_epoch_end: EpochHook) -> Any:
    """The default trainer: one model on the data layer (a fresh Keras graph per model)."""
    return data.fit(settings, seed, epochs=epochs, on_epoch_end=on_epoch_end)


def final_value(history: Sequence[Mapping[str, Any]], best_epoch: int, objective: str) -> float:
    """The objective at the epoch whose weights the trained model holds (early stopping restores it)."""
    if not history:
        raise AllfuseError("the trial trained no epoch")
    row = next((r for r in history if r.get("epoch") == best_epoch), history[-1])
    if objective not in row:
        raise AllfuseError(f"tune.objective '{objective}' is not among the trainer's metrics ({', '.join(sorted(row))})")
    return float(row[objective])


def tune(job: TuneJob, trainer: Trainer = fit_trial) -> dict[str, Any]:
    """Run (or resume, or top up) the study of ``job`` and write best_params.json and trials.csv.

    ``trainer`` trains one trial's model (default: the data layer's own fit). Returns the
    best_params.json record.
    """
    if not job.tune.search_space:
        raise ConfigError(f"the search space of backbone '{job.backbone}' is empty: give at least one range, "
                          "or set tune.n_trials: 0 to skip tuning")  # fmt: skip
    job.db_path.parent.mkdir(parents=True, exist_ok=True)
    with compute_session(job.runtime) as session:
        log.info("study %s on %s, device %s", job.name, job.db_path, session.device)
        data = load_training_data(job.base["mode"], job.data, job.split, job.fold, subsets=("train", "val"))
        settings_hash = study_hash(job.tune, job.base, data.digest())
        with studies.study_lock(job.db_path):
            existing, _ = studies.prepare_study_file(job.db_path, job.name, settings_hash)
            storage = studies.open_storage(job.db_path, heartbeat=True)
            try:
                tags = {T.BACKBONE: job.backbone, T.FOLD: job.fold, T.DEVICE: session.device,
                        T.TF_THREADS: session.tf_threads or "default"}  # fmt: skip
                return _run_study(job, data, trainer, storage, existing, settings_hash, tags)
            finally:
                storage.remove_session()
                storage.engine.dispose()


def _open_study(job: TuneJob, storage: Any, existing: int, settings_hash: str) -> optuna.Study:
    """The study in its storage, new or resumed; a new one gets its identity and enqueued trials."""
    import optuna

    # A resumed study gets a sampler seeded past its existing trials: reseeding with the config
    # seed would redraw the first run's random start-up points. A study run in one go uses the
    # config seed exactly.
    sampler = optuna.samplers.TPESampler(seed=job.tune.seed + existing, n_startup_trials=job.tune.tpe_startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=job.tune.n_startup_trials,
                                         n_warmup_steps=job.tune.n_warmup_steps)  # fmt: skip
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=job.name,
                                direction=job.tune.direction, load_if_exists=True)  # fmt: skip
    if existing == 0 and not study.user_attrs.get(studies.HASH_ATTR):
        study.set_user_attr(studies.HASH_ATTR, settings_hash)
        study.set_user_attr(studies.SETTINGS_ATTR, study_identity(job.tune, job.base))
        for params in job.enqueue:
            study.enqueue_trial(dict(params))
    return study


def _run_study(job: TuneJob, data: TrainingData, trainer: Trainer, storage: Any, existing: int,
               settings_hash: str, tags: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    import optuna

    study = _open_study(job, storage, existing, settings_hash)
    orphans = studies.fail_orphaned_trials(study, studies.retry_callback())
    inputs = {k: v for k, v in job.data.items() if k in ("train", "val", "manifest", "images")} | {"split": job.split}
    tags = {**tags, T.STUDY: job.name, T.STUDY_DB: str(job.db_path), T.SETTINGS_HASH: settings_hash,
            T.N_TRIALS: job.tune.n_trials}  # fmt: skip
    with stage_run(job.context, "study", f"study-{job.name}", dataset=job.dataset,
                   synthetic=SplitFacts.read(job.split).synthetic, inputs=inputs,
                   outputs=[job.out_trials], record=job.out_best, tags=tags, where=False,
                   resume=study.user_attrs.get(studies.PARENT_ATTR)) as stage:  # fmt: skip
        if stage.run.run_id and study.user_attrs.get(studies.PARENT_ATTR) != stage.run.run_id:
            study.set_user_attr(studies.PARENT_ATTR, stage.run.run_id)
            stage.run.log_params(_study_params(job))
        _close_orphans(job, study, orphans)
        done = studies.count_finished(study)
        remaining = job.tune.n_trials - done
        log.info("study %s: %d of %d trials finished (%d resumed from %s), %d to run",
                 job.name, done, job.tune.n_trials, existing, job.db_path, max(remaining, 0))  # fmt: skip
        if remaining > 0:
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            study.optimize(_Objective(job, data, trainer, stage), n_trials=remaining + studies.MAX_EXTRA_FAILURES,
                           callbacks=[optuna.study.MaxTrialsCallback(job.tune.n_trials, states=states)],
                           gc_after_trial=True)  # fmt: skip
        _finish(job, study, settings_hash, stage)
    return read_json(job.out_best)


def _study_params(job: TuneJob) -> dict[str, Any]:
    return {
        "objective": job.tune.objective, "direction": job.tune.direction, "sampler": "TPESampler",
        "pruner": "MedianPruner", **{f"tune.{k}": v for k, v in job.tune.identity().items() if k != "search_space"},
        **{f"search_space.{s.name}": s.as_dict() for s in job.tune.search_space},
        **{f"hybrid.{k}": v for k, v in job.base.items()},
    }  # fmt: skip


def _close_orphans(job: TuneJob, study: optuna.Study, numbers: Sequence[int]) -> None:
    """Mark FAIL (tag) and KILLED the trial runs of trials whose process died."""
    store = job.context.store
    if store is None or not numbers:
        return
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get(studies.RUN_ATTR)
        if trial.number in numbers and run_id and tracking.run_exists(store.uri, run_id):
            run = tracking.Run(store.uri, run_id)
            run.set_tags({T.TRIAL_STATE: "FAIL"})
            run.set_status("KILLED")


def _finish(job: TuneJob, study: optuna.Study, settings_hash: str, stage: StageRun) -> dict[str, Any]:
    """Check the budget was met, write trials.csv, tag the best trial; the best_params record."""
    import optuna

    finished = studies.count_finished(study)
    if finished < job.tune.n_trials:
        failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
        raise AllfuseError(f"study {job.name}: only {finished} of {job.tune.n_trials} trials finished, {failed} "
                           f"failed; see the log and {job.db_path}; rerun to resume")  # fmt: skip
    rows = studies.trials_table(study)
    write_csv(job.out_trials, rows, studies.trials_columns(rows))
    record = studies.best_record(study, job.tune.objective, job.tune.direction, settings_hash, job.db_path)
    best_run = _tag_best(job, study)
    stage.run.set_tags({f"{T.BEST}{k}": v for k, v in record["params"].items()}
                       | {T.BEST_TRIAL: record["trial"], T.BEST_RUN_ID: best_run or ""})  # fmt: skip
    _log_best_params(stage, record["params"])
    stage.run.log_metrics({"best_value": float(record["value"]), "best_trial": float(record["trial"]),
                           **{k: float(record[k]) for k in ("n_complete", "n_pruned", "n_failed")}})  # fmt: skip
    stage.run.log_artifact(job.out_trials)
    stage.record.update(record)
    log.info("study %s: best trial %d, %s = %.4g, %s", job.name, record["trial"], record["objective"],
             record["value"], record["params"])  # fmt: skip
    return stage.record


def _tag_best(job: TuneJob, study: optuna.Study) -> str | None:
    """Tag the best trial's run best_trial=true (and a former best's false); its run id."""
    store = job.context.store
    best_run = study.best_trial.user_attrs.get(studies.RUN_ATTR)
    if store is None:
        return best_run
    previous = study.user_attrs.get(studies.BEST_RUN_ATTR)
    if previous and previous != best_run and tracking.run_exists(store.uri, previous):
        tracking.Run(store.uri, previous).set_tags({T.BEST_TRIAL: "false"})
    if best_run and tracking.run_exists(store.uri, best_run):
        tracking.Run(store.uri, best_run).set_tags({T.BEST_TRIAL: "true"})
        study.set_user_attr(studies.BEST_RUN_ATTR, best_run)
    return best_run


def _log_best_params(stage: StageRun, params: Mapping[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        stage.run.log_params({f"best.{k}": v for k, v in params.items()})
    except MlflowException as exc:  # params are immutable: the best changed after a top-up
        log.warning("best parameters changed since they were logged to run %s; see its tags (%s)",
                    stage.run.run_id, exc)  # fmt: skip


class _Objective:
    """Optuna objective: one trial = one model trained on train, scored on val, logged to MLflow."""

    def __init__(self, job: TuneJob, data: TrainingData, trainer: Trainer, stage: StageRun) -> None:
        self.job, self.data, self.trainer, self.stage = job, data, trainer, stage
        self.objective = job.tune.objective

    def __call__(self, trial: optuna.Trial) -> float:
        # Retried trials inherit their predecessor's user attributes: overwrite them first.
        trial.set_user_attr(studies.OWNER_ATTR, studies.owner())
        params = suggest(trial, self.job.tune.search_space)
        run = self.stage.child("trial", f"trial-{self.job.name}-{trial.number}",
                               {T.BACKBONE: self.job.backbone, T.FOLD: self.job.fold, T.STUDY: self.job.name,
                                T.TRIAL: trial.number})  # fmt: skip
        run.log_params({**params, "trial": trial.number})
        trial.set_user_attr(studies.RUN_ATTR, run.run_id)
        start, epochs_seen, state, status = time.perf_counter(), [0], "FAIL", "FAILED"
        try:
            value = self._train(trial, params, run, epochs_seen)
            state, status = "COMPLETE", "FINISHED"
            return value
        except Exception as exc:
            import optuna

            if isinstance(exc, optuna.TrialPruned):
                state, status = "PRUNED", "FINISHED"
                log.info("trial %d pruned: %s %s", trial.number, exc, params)
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            run.log_metrics({"trial_seconds": time.perf_counter() - start, "epochs_run": float(epochs_seen[0])})
            run.set_tags({T.TRIAL_STATE: state})
            run.set_status(status)

    def _train(self, trial: optuna.Trial, params: Mapping[str, Any], run: Any, epochs_seen: list[int]) -> float:
        import optuna

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            epochs_seen[0] = epoch
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            run.log_metrics(metrics, step=epoch)
            value = metrics.get(self.objective)
            log.info("trial %d epoch %d: %s = %s", trial.number, epoch, self.objective, value)
            if value is None:
                raise AllfuseError(f"tune.objective '{self.objective}' is not among the trainer's metrics "
                                   f"({', '.join(sorted(logs))})")  # fmt: skip
            if not math.isfinite(value):
                # A diverged (or undefined) metric cannot be ranked; stop the trial as a bad one.
                raise optuna.TrialPruned(f"{self.objective} is {value} at epoch {epoch}")
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.objective} {value:.4g} at epoch {epoch} is worse than the median")

        settings = self.job.trial_settings(params)
        result = self.trainer(self.data, settings, self.job.tune.seed, epochs=self.job.tune.epochs,
                              on_epoch_end=on_epoch_end)  # fmt: skip
        value = final_value(result.history, result.best_epoch, self.objective)
        trial.set_user_attr(studies.BEST_EPOCH_ATTR, int(result.best_epoch))
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.objective} is {value} at the best epoch")
        run.log_metrics({"objective_value": value, "best_epoch": float(result.best_epoch)})
        log.info("trial %d: %s = %.4g at epoch %d %s", trial.number, self.objective, value, result.best_epoch, params)
        return value
