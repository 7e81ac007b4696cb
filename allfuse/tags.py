"""The MLflow tag schema: every tag an allfuse run carries, in one list.

Every run belongs to one level (``LEVELS``): a trial of a study, a study, a member, the classical
baseline, an ensemble (the parent of its members), a fusion, the evaluation, the packaged
predictor. Every run carries the common tags; each level adds its own. A name ending in "." is a family: ``allfuse.sha256.`` stands for
``allfuse.sha256.<input>``, one tag per input file. ``check_tags`` says what a run's tags miss or
hold beyond the schema; the tests run it on every run of a micro DAG, and docs/ARCHITECTURE.md
shows :func:`schema_markdown`.

Code refers to tags by the constants below, never by a string of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LEVELS = ("trial", "study", "member", "baseline", "ensemble", "fusion", "evaluation", "package")
ALL = LEVELS

# Common to every run.
VERSION = "allfuse.version"
LEVEL = "allfuse.level"
RULE = "allfuse.rule"
JOB = "allfuse.job"
WILDCARDS = "allfuse.wildcards"
CONFIG_SHA256 = "allfuse.config_sha256"
GIT_COMMIT = "allfuse.git_commit"
GIT_DIRTY = "allfuse.git_dirty"
MLFLOW_COMMIT = "mlflow.source.git.commit"
MLFLOW_PARENT = "mlflow.parentRunId"
HOST = "allfuse.host"
PID = "allfuse.pid"
AWAITS = "allfuse.awaits"
SLURM_JOB = "allfuse.slurm_job_id"
SYNTHETIC = "allfuse.synthetic"
DATASET = "allfuse.dataset"
SHA256 = "allfuse.sha256."
# What a run is about.
BACKBONE = "allfuse.backbone"
SEED = "allfuse.seed"
SEEDS = "allfuse.seeds"
FOLD = "allfuse.fold"
DEVICE = "allfuse.device"
TF_THREADS = "allfuse.tf_threads"
TUNED = "allfuse.tuned"
COLLAPSED = "allfuse.collapsed"
DROPPED = "allfuse.dropped_seeds"
# Studies and trials.
STUDY = "allfuse.study"
STUDY_DB = "allfuse.study_db"
SETTINGS_HASH = "allfuse.settings_hash"
N_TRIALS = "allfuse.n_trials"
WORKERS = "allfuse.workers"
WORKER = "allfuse.worker"
TRIAL = "allfuse.trial"
TRIAL_STATE = "allfuse.trial_state"
BEST_TRIAL = "allfuse.best_trial"
BEST_RUN_ID = "allfuse.best_run_id"
BEST = "allfuse.best."
# Links between levels.
N_MEMBERS = "allfuse.n_members"
MEMBER_RUN_IDS = "allfuse.member_run_ids"
ENSEMBLE_RUN = "allfuse.ensemble_run."
MEMBER_RUNS = "allfuse.member_runs."
FUSION_RUN = "allfuse.fusion_run."
ENSEMBLE_RUNS = "allfuse.ensemble_runs."
# The classical baseline.
BASELINE_MODEL = "allfuse.baseline_model"
BASELINE_RUN = "allfuse.baseline_run."
# The packaged predictor (run tags), and what only its registered model versions carry.
FUSION_RULE = "allfuse.fusion_rule"
REGISTERED_MODEL = "allfuse.registered_model"
MODEL_VERSION = "allfuse.model_version"
PREDICTOR_SHA256 = "allfuse.predictor_sha256"
EVALUATION_RUN = "allfuse.evaluation_run"
PACKAGE_RUN = "allfuse.package_run"
REFERRAL_THRESHOLD = "allfuse.referral_threshold"

#: Tags whose values differ between two otherwise identical runs; they never enter a run's id.
VOLATILE = (HOST, PID, SLURM_JOB)


@dataclass(frozen=True)
class Tag:
    """One tag (or family, a name ending in "."), the levels whose runs carry it, whether every
    such run must, and what it means."""

    name: str
    levels: tuple[str, ...]
    required: bool
    meaning: str


_COMPUTE = ("trial", "study", "member")
SCHEMA: tuple[Tag, ...] = (
    Tag(VERSION, ALL, True, "allfuse package version"),
    Tag(LEVEL, ALL, True, "trial, study, member, baseline, ensemble, fusion, evaluation or package"),
    Tag(RULE, ALL, True, "the workflow rule whose job created the run"),
    Tag(JOB, ALL, True, "rule/wildcard values: the job that owns the run"),
    Tag(WILDCARDS, ALL, True, "the job's wildcards as JSON"),
    Tag(CONFIG_SHA256, ALL, True, "sha256 of the whole resolved workflow config (the same meaning on every run)"),
    Tag(GIT_COMMIT, ALL, True, "commit of the workflow's source tree ('unknown' outside git)"),
    Tag(GIT_DIRTY, ALL, True, "true when tracked files differ from that commit"),
    Tag(MLFLOW_COMMIT, ALL, True, "the same commit, where MLflow's UI shows it"),
    Tag(HOST, ALL, True, "host the job ran on"),
    Tag(PID, ALL, True, "process id of the job (a RUNNING run whose process is gone ends KILLED when the next stage starts)"),
    Tag(SLURM_JOB, ALL, False, "the Slurm job the job ran as (set only under Slurm)"),
    Tag(SYNTHETIC, ALL, True, "true when the data are the synthetic demo archives"),
    Tag(DATASET, ALL, True, "dataset(s) the run covers, comma-separated"),
    Tag(SHA256, ALL, True, "sha256 of each input file, by input name"),
    Tag(MLFLOW_PARENT, ("trial", "member"), True, "the study (trial) or ensemble (member) run"),
    Tag(BACKBONE, ("trial", "study", "member", "ensemble"), True, "the hybrid's backbone"),
    Tag(FOLD, ("trial", "study", "member", "baseline", "ensemble", "fusion", "package"), True, "fold of the split file"),
    Tag(SEED, ("member", "baseline"), True, "the member's seed (baseline: its estimator's seed)"),
    Tag(SEEDS, ("ensemble",), True, "the ensemble's seeds, as JSON"),
    Tag(DEVICE, ("trial", "member"), True, "cpu, or gpu:<ids> the job ran on (trial: its worker's job)"),
    Tag(TF_THREADS, ("trial", "member"), True, "TensorFlow intra-op threads ('default' when left to it)"),
    Tag(TUNED, ("member",), True, "hyperparameters taken from the study's best trial ('none' without a study)"),
    Tag(STUDY, ("trial", "study"), True, "Optuna study name"),
    Tag(STUDY_DB, ("study",), True, "the study's storage: its journal file, or the database URL without a password"),
    Tag(SETTINGS_HASH, ("study",), True, "hash of what makes the study's trials comparable"),
    Tag(N_TRIALS, ("study",), True, "the study's trial budget (finished trials, over all workers)"),
    Tag(WORKERS, ("study",), True, "tuning jobs sharing the study (tune.workers)"),
    Tag(WORKER, ("trial",), True, "the worker (0 .. workers-1) whose job ran the trial"),
    Tag(TRIAL, ("trial",), True, "trial number"),
    Tag(TRIAL_STATE, ("trial",), True, "COMPLETE, PRUNED or FAIL"),
    Tag(BEST_TRIAL, ("trial", "study"), False, "trial: whether it is the study's best; study: the best trial's number"),
    Tag(BEST_RUN_ID, ("study",), False, "the best trial's run"),
    Tag(BEST, ("study",), False, "the best trial's value of each tuned hyperparameter"),
    Tag(COLLAPSED, ("member",), False, "subsets predicted all one class, e.g. 'val,test' ('none'; set once trained)"),
    Tag(AWAITS, ("ensemble",), False, "the rule that closes a run opened for later jobs (an ensemble's parent run: "
        "aggregate_ensemble), until that rule resumes it; such a run is left RUNNING when its opener exits"),
    Tag(DROPPED, ("ensemble",), False, "seeds of collapsed members left out (ensemble.drop_collapsed), 'none'"),
    Tag(N_MEMBERS, ("ensemble",), False, "members averaged (once aggregated)"),
    Tag(MEMBER_RUN_IDS, ("ensemble",), False, "the members' runs, comma-separated (once aggregated)"),
    Tag(ENSEMBLE_RUN, ("fusion",), True, "each backbone's ensemble run"),
    Tag(MEMBER_RUNS, ("fusion",), True, "each backbone's member runs, comma-separated"),
    Tag(FUSION_RUN, ("evaluation", "package"), True, "each dataset's fusion run (package: the one packaged)"),
    Tag(ENSEMBLE_RUNS, ("evaluation",), True, "each dataset's ensemble runs, comma-separated"),
    Tag(MEMBER_RUNS, ("evaluation",), True, "each dataset's member runs, comma-separated"),
    Tag(BASELINE_MODEL, ("baseline",), True, "the baseline's scikit-learn estimator (random_forest or logistic)"),
    Tag(BASELINE_RUN, ("evaluation",), False, "each dataset's baseline runs, comma-separated"),
    Tag(MEMBER_RUNS, ("package",), True, "each backbone's packaged member runs, comma-separated"),
    Tag(FUSION_RULE, ("package",), True, "the packaged predictor's fusion rule"),
    Tag(REGISTERED_MODEL, ("package",), True, "registered model name in the MLflow Model Registry"),
    Tag(MODEL_VERSION, ("package",), False, "the registered version (once registered)"),
)


def _matches(tag: Tag, name: str) -> bool:
    return name.startswith(tag.name) if tag.name.endswith(".") else name == tag.name


def check_tags(tags: Mapping[str, str]) -> list[str]:
    """What is wrong with one run's tags: required tags of its level missing, allfuse tags the
    schema does not list for that level. [] when the run follows the schema."""
    level = tags.get(LEVEL)
    if level not in LEVELS:
        return [f"{LEVEL} is {level!r}, not one of {', '.join(LEVELS)}"]
    mine = [t for t in SCHEMA if level in t.levels]
    problems = [f"missing {t.name}" for t in mine if t.required and not any(_matches(t, n) for n in tags)]
    ours = [n for n in tags if n.startswith("allfuse.") or n in (MLFLOW_COMMIT, MLFLOW_PARENT)]
    problems += [f"{n} is not in the tag schema of level {level}" for n in ours if not any(_matches(t, n) for t in mine)]
    return problems


def schema_markdown() -> str:
    """The schema as a Markdown table (docs/ARCHITECTURE.md holds a copy; a test compares them)."""
    lines = ["| tag | levels | required | meaning |", "|---|---|---|---|"]
    for t in SCHEMA:
        name = f"{t.name}<name>" if t.name.endswith(".") else t.name
        levels = "all" if t.levels == ALL else ", ".join(t.levels)
        lines.append(f"| `{name}` | {levels} | {'yes' if t.required else 'no'} | {t.meaning} |")
    return "\n".join(lines) + "\n"
