"""Bayesian hyperparameter optimisation: one Optuna study per (dataset, fold, backbone), validation only.

A study samples hyperparameters with TPE, trains one model per trial on the TRAINING split,
scores it on the VALIDATION split (``tune.objective``) and stops unpromising trials early with a
median pruner fed the per-epoch validation metric. The test split is never loaded: the data layer
(``allfuse.training_data``) is asked for the train and val subsets only.

``tune`` is what the workflow's tuning jobs call, once per worker: ``tune.workers`` jobs (rule
``tune_worker``, each its own GPU job) share the study and run its trials until it holds
``tune.n_trials`` finished ones in total. ``collect_study`` (rule ``collect_study``, after every
worker) writes ``best_params.json``, which every ensemble member of that backbone reads
(``allfuse.members.resolve_hyperparameters``), and ``trials.csv``. A one-worker study (the
default) is one job, rule ``tune_backbone``: ``tune``, then ``collect_study``
(``CollectJob.after``) in the same process; its trials run one after another exactly as a single
process would run them.

The sampler's settings are pinned (``TPE_PINNED``) and recorded in the study, the MLflow study
run and best_params.json; each worker's sampler has its own seed (``worker_seed``), recorded on
every trial with the worker that ran it. The study's storage, its budget lock, resumption after a
crash and its staleness are ``allfuse.studies``'; the search space is parsed once, at start-up
(``allfuse.settings.TuneSettings``).

MLflow: one study run per study (``allfuse.stages``), created by the first worker, shared by all
(its id is kept in the study) and ended FINISHED by ``collect_study``; a worker that fails ends it
FAILED (KILLED when interrupted) until the next worker resumes it. Each trial is a child run
holding the trial's parameters and sampler seed, its worker (tag ``allfuse.worker``) and that
job's device, every epoch's metrics as steps, its final state as the tag ``allfuse.trial_state``
(COMPLETE, PRUNED, FAIL) and its duration. The best trial's run is tagged
``allfuse.best_trial=true``; the best parameters go to the study's run (params ``best.<name>``,
tags ``allfuse.best.<name>``, artifacts ``best_params.json`` and ``trials.csv``).
"""

from __future__ import annotations

import contextlib
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
from allfuse.studies import StudyPlace
from allfuse.training_data import TrainingData, load_training_data

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]
# trainer(data, settings, seed, *, epochs, on_epoch_end) -> object with .history (list of
# per-epoch dicts with "epoch" and the metrics) and .best_epoch (the epoch whose weights the model
# holds, as in allfuse.training.TrainResult).
Trainer = Callable[..., Any]

#: TPESampler's arguments besides n_startup_trials (tune.tpe_startup_trials) and seed, pinned so a
#: study means the same on every Optuna version. They are Optuna 5.0's defaults, which every
#: earlier study of this project ran with: multivariate TPE over all tuned parameters, no group
#: decomposition, 24 expected-improvement candidates, and the constant liar: a trial other workers
#: are running counts as a bad one, so parallel workers do not crowd one region (with one worker
#: no other trial runs and it changes nothing). Optuna's deprecated Parzen-estimator arguments
#: (prior weight, magic clip, endpoints, gamma, weights) cannot be set without a warning; they
#: keep their fixed values.
TPE_PINNED: dict[str, Any] = {"multivariate": True, "group": False, "constant_liar": True, "n_ei_candidates": 24}


def study_name(dataset: str, fold: int, backbone: str) -> str:
    """The Optuna study's name, e.g. ``ALL_IDB2-fold0-mobilenetv2`` (unique in a results tree)."""
    return f"{dataset}-fold{fold}-{backbone}"


@dataclass(frozen=True)
class TuneJob:
    """One worker of a study, as values and paths (no Snakemake objects).

    base: the hybrid settings the study depends on (``HybridSettings.study_view``: all but the
    tuned keys, which each trial draws, and ``epochs``, which is ``tune.epochs``).
    data: head mode {"train", "val"} feature files; finetune mode {"manifest", "images"}. Any
    other key (a "test" file) is ignored. out_record: the worker's record (``worker<i>.json``);
    the study's folder (journal file, lock files) is the one it is in.
    worker: 0 .. tune.workers - 1. enqueue: parameter sets evaluated first when the study is new.
    """

    dataset: str
    backbone: str
    base: Mapping[str, Any]
    tune: TuneSettings
    data: Mapping[str, str]
    split: str
    out_record: str
    runtime: Runtime
    context: StageContext
    fold: int = 0
    worker: int = 0
    enqueue: Sequence[Mapping[str, Any]] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return study_name(self.dataset, self.fold, self.backbone)

    @property
    def place(self) -> StudyPlace:
        return StudyPlace(self.name, Path(self.out_record).parent, self.tune.storage)

    def trial_settings(self, params: Mapping[str, Any]) -> HybridSettings:
        """A trial's hybrid settings: the study's base, the trial's values, the tuning epochs."""
        return HybridSettings.from_params({**self.base, **params, "epochs": self.tune.epochs})


@dataclass(frozen=True)
class CollectJob:
    """The collecting step of a study, after all its workers: ``workers`` are their records;
    best_params.json and trials.csv go to ``out_best`` and ``out_trials`` in the study's folder."""

    dataset: str
    backbone: str
    tune: TuneSettings
    split: str
    workers: Sequence[str]
    out_best: str
    out_trials: str
    context: StageContext
    fold: int = 0

    @property
    def name(self) -> str:
        return study_name(self.dataset, self.fold, self.backbone)

    @property
    def place(self) -> StudyPlace:
        return StudyPlace(self.name, Path(self.out_best).parent, self.tune.storage)

    @classmethod
    def after(cls, worker: TuneJob, out_best: str, out_trials: str) -> CollectJob:
        """The collecting step of a one-worker study, run by that worker's job once its trials
        are done (rule ``tune_backbone``: one process, where two jobs each started TensorFlow or
        MLflow for it)."""
        return cls(dataset=worker.dataset, backbone=worker.backbone, tune=worker.tune, split=worker.split,
                   workers=[worker.out_record], out_best=out_best, out_trials=out_trials, context=worker.context,
                   fold=worker.fold)  # fmt: skip


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
    without the budget (a budget change tops up instead of restarting) and how the study runs
    (workers, storage), the parsed search space, the study's base hybrid settings (tuned keys left
    out) and the digest of the training and validation data."""
    tuned = set(tune.tuned)
    return {"tune": tune.identity(), "settings": {k: v for k, v in base.items() if k not in tuned}, "data": data_digest}


def study_hash(tune: TuneSettings, base: Mapping[str, Any], data_digest: str = "") -> str:
    """sha256 of ``study_identity``: equal hashes mean trials of one study may be pooled."""
    return sha256_json(study_identity(tune, base, data_digest))


def sampler_settings(tune: TuneSettings, seed: int) -> dict[str, Any]:
    """Every argument the study's TPESampler is built with: ``TPE_PINNED``, tune.tpe_startup_trials
    and ``seed``."""
    return {"n_startup_trials": tune.tpe_startup_trials, **TPE_PINNED, "seed": seed}


def worker_seed(tune: TuneSettings, worker: int, existing: int) -> int:
    """The sampler seed of ``worker`` joining a study that holds ``existing`` trials:
    ``tune.seed + worker + tune.workers * existing``.

    One worker: tune.seed, and a resumed study does not redraw its first run's random start-up
    points. Several: no two workers of one study share a seed, whatever each found (their seeds
    differ modulo tune.workers).
    """
    return tune.seed + worker + tune.workers * existing


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
    """Run worker ``job.worker`` of the study of ``job`` (new, resumed or topped up) until the study
    holds ``tune.n_trials`` finished trials, counting every worker's; write and return its record.

    ``trainer`` trains one trial's model (default: the data layer's own fit). The study's tables
    are :func:`collect_study`'s.
    """
    if not job.tune.search_space:
        raise ConfigError(f"the search space of backbone '{job.backbone}' is empty: give at least one range, "
                          "or set tune.n_trials: 0 to skip tuning")  # fmt: skip
    with compute_session(job.runtime) as session:
        log.info("study %s, worker %d of %d, in %s, device %s", job.name, job.worker, job.tune.workers,
                 job.place.label, session.device)  # fmt: skip
        data = load_training_data(job.base["mode"], job.data, job.split, job.fold, subsets=("train", "val"))
        settings_hash = study_hash(job.tune, job.base, data.digest())
        facts = {T.DEVICE: session.device, T.TF_THREADS: session.tf_threads or "default"}
        with studies.worker_lock(job.place, job.worker), contextlib.ExitStack() as stack:
            budget = studies.BudgetLock(job.place)
            with budget:  # one worker at a time sets the study (and its MLflow run) up
                study, existing, seed = _join_study(job, settings_hash, stack)
                stage = stack.enter_context(_study_stage(job, study, settings_hash))
                _adopt_run(job, study, stage)
            objective = _Objective(job, data, trainer, stage, budget, seed, facts)
            _work(job, study, objective, existing)
    return read_json(job.out_record)


def _join_study(job: TuneJob, settings_hash: str, stack: contextlib.ExitStack) -> tuple[optuna.Study, int, int]:
    """Under the budget lock: the study in its storage, new, resumed or set aside and started
    afresh (``studies.prepare_study``), with this worker's sampler; (study, trials it held, seed)."""
    existing, _ = studies.prepare_study(job.place, settings_hash)
    storage = studies.open_storage(job.place, heartbeat=job.tune.storage is not None)
    stack.callback(studies.close_storage, storage)
    seed = worker_seed(job.tune, job.worker, existing)
    return _open_study(job, storage, existing, settings_hash, seed), existing, seed


def _open_study(job: TuneJob, storage: Any, existing: int, settings_hash: str, seed: int) -> optuna.Study:
    """The study in its storage, new or resumed; a new one gets its identity, its sampler's
    settings and the enqueued trials."""
    import optuna

    sampler = optuna.samplers.TPESampler(**sampler_settings(job.tune, seed))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=job.tune.n_startup_trials,
                                         n_warmup_steps=job.tune.n_warmup_steps)  # fmt: skip
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=job.name,
                                direction=job.tune.direction, load_if_exists=True)  # fmt: skip
    recorded = _sampler_record(job.tune)
    if existing == 0 and not study.user_attrs.get(studies.HASH_ATTR):
        study.set_user_attr(studies.HASH_ATTR, settings_hash)
        study.set_user_attr(studies.SETTINGS_ATTR, study_identity(job.tune, job.base))
        study.set_user_attr(studies.SAMPLER_ATTR, recorded)
        for params in job.enqueue:
            study.enqueue_trial(dict(params))
    elif study.user_attrs.get(studies.SAMPLER_ATTR, recorded) != recorded:
        log.warning("study %s was started with sampler settings %s; this worker samples with %s", job.name,
                    study.user_attrs[studies.SAMPLER_ATTR], recorded)  # fmt: skip
    return study


def _sampler_record(tune: TuneSettings) -> dict[str, Any]:
    """The sampler as a study records it: its settings with the study's base seed, how each worker's
    seed derives from it, the Optuna version."""
    import optuna

    return {"name": "TPESampler", **sampler_settings(tune, tune.seed),
            "worker_seed": "seed + worker + workers * trials_in_study_when_the_worker_started",
            "optuna": optuna.__version__}  # fmt: skip


def _study_tags(job: TuneJob | CollectJob, settings_hash: str) -> dict[str, Any]:
    return {T.BACKBONE: job.backbone, T.FOLD: job.fold, T.STUDY: job.name, T.STUDY_DB: job.place.label,
            T.SETTINGS_HASH: settings_hash, T.N_TRIALS: job.tune.n_trials, T.WORKERS: job.tune.workers}  # fmt: skip


def _study_stage(job: TuneJob, study: optuna.Study, settings_hash: str) -> Any:
    """The study's stage run as this worker sees it: resumed (or created, by the first worker), left
    RUNNING when the worker ends; the worker's record is the stage's record."""
    inputs = {k: v for k, v in job.data.items() if k in ("train", "val", "manifest", "images")} | {"split": job.split}
    return stage_run(job.context, "study", f"study-{job.name}", dataset=job.dataset,
                     synthetic=SplitFacts.read(job.split).synthetic, inputs=inputs, record=job.out_record,
                     tags=_study_tags(job, settings_hash), where=False, finish=False,
                     resume=study.user_attrs.get(studies.PARENT_ATTR))  # fmt: skip


def _adopt_run(job: TuneJob, study: optuna.Study, stage: StageRun) -> None:
    """A study run just created becomes the study's (kept in the study for every worker and the
    collecting step) and gets the study's settings as params."""
    if stage.run.run_id and study.user_attrs.get(studies.PARENT_ATTR) != stage.run.run_id:
        study.set_user_attr(studies.PARENT_ATTR, stage.run.run_id)
        stage.run.log_params(_study_params(job))


def _work(job: TuneJob, study: optuna.Study, objective: _Objective, existing: int) -> None:
    """Run trials until the study holds its budget, counting every worker's (``allfuse.studies``:
    a trial starts only under the budget lock, when finished plus running trials are below it).

    Fails when more than ``studies.MAX_EXTRA_FAILURES`` of this worker's trials failed, so a rerun
    resumes the study.
    """
    done, budget = studies.count_finished(study), job.tune.n_trials
    log.info("study %s, worker %d of %d: %d of %d trials finished (%d resumed from %s), sampler seed %d",
             job.name, job.worker, job.tune.workers, done, budget, existing, job.place.label, objective.seed)  # fmt: skip
    retry = studies.retry_callback()
    while objective.failed <= studies.MAX_EXTRA_FAILURES:
        objective.budget.acquire()
        try:
            orphans = studies.fail_orphaned_trials(study, job.worker, retry)
            if not orphans:
                done, running = studies.count_finished(study), studies.count_running(study)
                if done + running >= budget:
                    break
                # The trial starts (ask) under the lock; the objective releases it once the trial is marked.
                study.optimize(objective, n_trials=1, gc_after_trial=True, callbacks=[objective.ended])
        finally:
            objective.budget.release()
        _close_orphans(job, study, orphans)  # MLflow, outside the lock; their retries are next
    done = studies.count_finished(study)
    objective.stage.record.update({"study": job.name, "worker": job.worker, "workers": job.tune.workers,
                                   "storage": job.place.label, "sampler_seed": objective.seed,
                                   "trials": objective.ran, "finished": done})  # fmt: skip
    if objective.failed > studies.MAX_EXTRA_FAILURES:
        raise AllfuseError(f"study {job.name}, worker {job.worker}: {objective.failed} trials failed; the study "
                           f"holds {done} of {budget} finished trials; see the log and {job.place.label}; rerun to "
                           "resume")  # fmt: skip
    log.info("study %s, worker %d: ran trials %s; the study holds %d of %d finished trials, %d running elsewhere",
             job.name, job.worker, objective.ran, done, budget, studies.count_running(study))  # fmt: skip


def collect_study(job: CollectJob) -> dict[str, Any]:
    """After every worker of the study ended: check it holds its budget, write trials.csv and
    best_params.json (the record, returned), tag the best trial's run, and end the study's MLflow
    run FINISHED with the best parameters."""
    import optuna

    storage = studies.open_storage(job.place)
    try:
        try:
            study = optuna.load_study(study_name=job.name, storage=storage)
        except KeyError:
            raise AllfuseError(f"no study {job.name} in {job.place.label}: run its tuning workers first") from None
        settings_hash = str(study.user_attrs.get(studies.HASH_ATTR, ""))
        inputs = {f"worker{i}": path for i, path in enumerate(job.workers)} | {"split": job.split}
        with stage_run(job.context, "study", f"study-{job.name}", dataset=job.dataset,
                       synthetic=SplitFacts.read(job.split).synthetic, inputs=inputs, outputs=[job.out_trials],
                       record=job.out_best, tags=_study_tags(job, settings_hash), where=False,
                       resume=study.user_attrs.get(studies.PARENT_ATTR)) as stage:  # fmt: skip
            _finish(job, study, settings_hash, stage)
    finally:
        studies.close_storage(storage)
    return read_json(job.out_best)


def _study_params(job: TuneJob) -> dict[str, Any]:
    return {
        "objective": job.tune.objective, "direction": job.tune.direction, "sampler": "TPESampler",
        **{f"sampler.{k}": v for k, v in _sampler_record(job.tune).items() if k != "name"},
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


def _finish(job: CollectJob, study: optuna.Study, settings_hash: str, stage: StageRun) -> dict[str, Any]:
    """Check the budget was met, write trials.csv, tag the best trial; the best_params record
    (with the sampler's settings and the seeds each worker used)."""
    import optuna

    finished = studies.count_finished(study)
    if finished < job.tune.n_trials:
        failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
        raise AllfuseError(f"study {job.name}: only {finished} of {job.tune.n_trials} trials finished, {failed} "
                           f"failed; see the workers' logs and {job.place.label}; rerun to resume")  # fmt: skip
    rows = studies.trials_table(study)
    write_csv(job.out_trials, rows, studies.trials_columns(rows))
    record = studies.best_record(study, job.tune.objective, job.tune.direction, settings_hash, job.place)
    record |= {"workers": job.tune.workers, "sampler": study.user_attrs.get(studies.SAMPLER_ATTR),
               "sampler_seeds": studies.sampler_seeds(study)}  # fmt: skip
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


def _tag_best(job: CollectJob, study: optuna.Study) -> str | None:
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

    def __init__(self, job: TuneJob, data: TrainingData, trainer: Trainer, stage: StageRun,
                 budget: studies.BudgetLock, seed: int, facts: Mapping[str, Any]) -> None:  # fmt: skip
        self.job, self.data, self.trainer, self.stage = job, data, trainer, stage
        self.budget, self.seed, self.facts = budget, seed, dict(facts)
        self.objective = job.tune.objective
        self.ran: list[int] = []
        self.failed = 0

    def ended(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback after each of this worker's trials: count it, and its failure."""
        self.ran.append(trial.number)
        self.failed += trial.state.name == "FAIL"

    def __call__(self, trial: optuna.Trial) -> float:
        # Retried trials inherit their predecessor's user attributes: overwrite them first.
        trial.set_user_attr(studies.OWNER_ATTR, studies.owner())
        trial.set_user_attr(studies.WORKER_ATTR, self.job.worker)
        trial.set_user_attr(studies.SEED_ATTR, self.seed)
        params = suggest(trial, self.job.tune.search_space)
        # The trial is marked as this worker's and its parameters are stored (the constant liar
        # shows them to the other workers' samplers): the next trial may be reserved now.
        self.budget.release()
        run = self.stage.child("trial", f"trial-{self.job.name}-{trial.number}",
                               {T.BACKBONE: self.job.backbone, T.FOLD: self.job.fold, T.STUDY: self.job.name,
                                T.TRIAL: trial.number, T.WORKER: self.job.worker, **self.facts})  # fmt: skip
        run.log_params({**params, "trial": trial.number, "sampler_seed": self.seed})
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
