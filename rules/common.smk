# Helpers shared by the rules: the output trees, input functions and the settings slices that
# rules receive through params. No rules here.

import os
from pathlib import Path

from allfuse import settings as afs
from allfuse.gpu import gpu_claim, thread_share
from allfuse.resources import (
    job_memory_mb,
    job_runtime_min,
    package_memory_mb,
    package_runtime_min,
    shape_of,
)

# Three parallel output trees: results, one log per job, one Snakemake benchmark file per job.
RESULTS = "results"
LOGS = "logs"
JOBSTATS = "jobstats"
SCRIPTS = "../workflow_scripts"
# Runtime paths under the results root, handed to the jobs that need them.
GPU_LOCKS = f"{RESULTS}/.gpu_locks"
MLFLOW_DIR = f"{RESULTS}/mlflow"
STORE = f"{MLFLOW_DIR}/store.json"

# The validated config as typed settings, built once per Snakemake start.
S = afs.from_config(config)
DATASETS = list(S.datasets)
BACKBONES = list(S.backbones)
SEEDS = list(S.seeds)
# Every fold of the split (kfold: n_folds x n_repeats; paper and grouped: fold 0) is a
# wildcard of every model's path, so all folds run in one invocation.
FOLDS = list(S.folds)
# GPU jobs claim one unit of `--resources gpu=N` on a host with a GPU, none on a CPU-only host
# (there they run side by side, paced by --cores and mem_mb). On a cluster the profile asks the
# scheduler for each GPU rule's card (profiles/slurm: `set-resources`, `gres: gpu:1`).
GPU = gpu_claim()


# The ALL-IDB datasets and the labelled sets (data.labelled) this config runs.
wildcard_constraints:
    dataset="|".join(S.dataset_names),
    backbone="|".join(afs.BACKBONES),
    seed=r"\d+",
    fold=r"\d+",
    worker=r"\d+",


def _check_sources():
    """Fail at start-up, naming the key, when a configured archive or labelled set is missing."""
    problems = []
    # allfuse.labelled is imported only for labelled sets: ALL-IDB dry runs stay as fast.
    if S.labelled:
        from allfuse.labelled import labelled_problem

        problems += [
            f"data.labelled.{name}: {exc}"
            for name, path in S.labelled.items()
            if (exc := labelled_problem(path)) is not None
        ]
    for name in [] if S.uses_demo else S.archives_needed:
        path = S.data["archives"].get(name)
        if path is None:
            problems.append(
                f"data.archives.{name} is null but datasets {DATASETS} need it: "
                "give its path, or list only the datasets you have archives for"
            )
        elif not Path(path).exists():
            problems.append(
                f"data.archives.{name}: {path} does not exist; give the path of the "
                ".zip, .tar(.gz) or extracted folder (or null for both to run the demo)"
            )
    if problems:
        raise WorkflowError("\n".join(problems))


_check_sources()
# The labelled sets' names as a wildcard constraint (never matching when there are none).
LABELLED = "|".join(S.labelled) or "(?!)"


def _check_tracking_uri():
    """At every start (dry runs too): a tracking URI, from the config or MLFLOW_TRACKING_URI,
    carries no password (it is written to store.json, run records and logs)."""
    from allfuse.errors import AllfuseError
    from allfuse.tracking import resolve_uri

    try:
        resolve_uri(S.tracking["uri"], MLFLOW_DIR)
    except AllfuseError as exc:
        raise WorkflowError(str(exc))


_check_tracking_uri()


def check_tracking_server():
    """Stop the workflow with one line naming the URI when the tracking server cannot be reached
    or refuses the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
    """
    from allfuse.errors import AllfuseError
    from allfuse.tracking import check_server, resolve_uri

    try:
        check_server(resolve_uri(S.tracking["uri"], MLFLOW_DIR))
    except AllfuseError as exc:
        raise WorkflowError(str(exc))


def archive_input(wildcards):
    """The archive an ingestion job reads: the configured one, or the generated demo."""
    if S.uses_demo:
        return f"{RESULTS}/demo/{wildcards.dataset}.zip"
    return S.data["archives"][wildcards.dataset]


def labelled_input(wildcards):
    """The folder or CSV file a labelled set is read from."""
    return S.labelled[wildcards.dataset]


def labelled_fingerprint(wildcards):
    """What the set's files are (paths, sizes, times): a param, so changed images rerun ingestion."""
    from allfuse.labelled import source_fingerprint

    return source_fingerprint(S.labelled[wildcards.dataset])


def groups_input(wildcards):
    """Slide groups for the grouped split protocol: the user's CSV, or the demo's own for the
    demo's datasets."""
    if S.data["groups_csv"]:
        return [S.data["groups_csv"]]
    if S.uses_demo and wildcards.dataset in afs.DATASETS:
        return [f"{RESULTS}/demo/slide_groups.csv"]
    return []


def member_dir(dataset, fold, backbone, seed):
    return f"{RESULTS}/members/{dataset}/fold{fold}/{backbone}/seed{seed}"


def member_dirs(dataset, fold, backbone):
    return [member_dir(dataset, fold, backbone, seed) for seed in SEEDS]


def ensemble_dir(dataset, fold, backbone):
    return f"{RESULTS}/ensembles/{dataset}/fold{fold}/{backbone}"


def fusion_dir(dataset, fold):
    return f"{RESULTS}/fusion/{dataset}/fold{fold}"


def packaged_members(wildcards, what):
    """A file of every member the dataset's packaged predictor holds (fold package.fold)."""
    return [
        f"{m}/{what}"
        for b in BACKBONES
        for m in member_dirs(wildcards.dataset, S.package.fold, b)
    ]


# One MLflow parent run per ensemble (dataset, fold, backbone), created by init_tracking before
# any member trains.
ENSEMBLES = [
    {
        "dataset": d,
        "fold": f,
        "backbone": b,
        "parent": f"{RESULTS}/members/{d}/fold{f}/{b}/parent_run.json",
        "manifest": f"{RESULTS}/data/{d}/manifest.csv",
        "split": f"{RESULTS}/splits/{d}.json",
    }
    for d in DATASETS
    for f in FOLDS
    for b in BACKBONES
]


def all_targets():
    # The metrics table takes every plot, ensemble and fusion as input: it pulls the whole DAG.
    splits = [f"{RESULTS}/splits/{dataset}.json" for dataset in DATASETS]
    members = [
        f"{m}/run.json"
        for d in DATASETS
        for f in FOLDS
        for b in BACKBONES
        for m in member_dirs(d, f, b)
    ]
    return (
        splits
        + members
        + [
            f"{RESULTS}/tables/metrics.csv",
            f"{RESULTS}/plots/fold_accuracy.png",
        ]
        + [f"{RESULTS}/models/{dataset}/registered.json" for dataset in DATASETS]
    )


# ---------------------------------------------------------------------------------------------
# Settings slices handed to rules through params (Snakemake's params trigger reruns exactly the
# jobs whose slice changed).
# ---------------------------------------------------------------------------------------------


def hybrid_of(wildcards):
    """One backbone's hybrid settings (hybrid defaults + its own block)."""
    return S.hybrid(wildcards.backbone).as_params()


def features_of(wildcards):
    return S.hybrid(wildcards.backbone).features().as_params()


def tune_of(wildcards):
    return S.study(wildcards.backbone).as_params()


def study_base_of(wildcards):
    """What a backbone's study depends on: its hybrid settings but the tuned keys and epochs."""
    return S.hybrid(wildcards.backbone).study_view(S.study(wildcards.backbone).tuned)


def training_data(wildcards, subsets=("train", "val", "test")):
    """Inputs a model of this backbone trains on: cached features (head) or images (finetune)."""
    if S.hybrid(wildcards.backbone).mode == "head":
        base = f"{RESULTS}/features/{wildcards.dataset}/fold{wildcards.fold}/{wildcards.backbone}"
        return {subset: f"{base}/{subset}.npz" for subset in subsets}
    base = f"{RESULTS}/data/{wildcards.dataset}"
    return {"manifest": f"{base}/manifest.csv", "images": f"{base}/images.npy"}


def tuning_data(wildcards):
    # The test subset is not an input of tuning: the study cannot read it.
    return training_data(wildcards, subsets=("train", "val"))


def worker_of(wildcards):
    """The study worker a tuning job is: its `worker` wildcard (tune_worker); tune_backbone, a
    one-worker study's job, is worker 0."""
    return int(getattr(wildcards, "worker", 0))


def study_backbones(several):
    """The backbones whose studies run as one job (`several` False: tune_backbone runs the study
    and writes its tables) or as tune.workers jobs and a collecting one (True: tune_worker, then
    collect_study), as a wildcard constraint (matching nothing when there are none)."""
    names = [b for b in BACKBONES if (S.study(b).workers > 1) == several]
    return "|".join(names) or "(?!)"


def study_workers(wildcards):
    """The records of a study's tune.workers tune_worker jobs, which collect_study waits for."""
    w = wildcards
    folder = f"{RESULTS}/tune/{w.dataset}/fold{w.fold}/{w.backbone}"
    return [f"{folder}/worker{i}.json" for i in range(S.study(w.backbone).workers)]


def best_params_input(wildcards):
    if S.study(wildcards.backbone).n_trials > 0:
        return [
            f"{RESULTS}/tune/{wildcards.dataset}/fold{wildcards.fold}/{wildcards.backbone}/best_params.json"
        ]
    return []


def fold_of(wildcards):
    return int(wildcards.fold)


def keras_threads(wildcards):
    """Threads of a Keras job (features, studies, members): on a cluster, the 4 cores it asks its
    scheduler for; on this host, 2 of `--cores`, so the default profile's `--cores 8` runs four
    side by side. On a small host they are single-threaded either way (`tf_threads`), and the
    third and fourth keep the cores busy while the others start up (imports), wait on the MLflow
    store or the disk, and while the DAG's last members finish: the demo took 545 s with four at
    once on 2 cores, 596 s with two (README, "Performance"). A GPU host still runs one at a time
    per card (`--resources gpu=1`).
    """
    return 4 if workflow.remote_exec or not workflow.local_exec else 2


def tf_threads(wildcards, threads):
    """Resource `tf_threads`: the TensorFlow threads of a compute job, its share of this host
    (allfuse.gpu.thread_share); a resource, not a param, so it never triggers a rerun. A job
    sent to a cluster owns the cores it asked for: there it is `threads`.
    """
    if workflow.remote_exec or not workflow.local_exec:
        return threads
    try:
        cores = workflow.cores
    except WorkflowError:  # no --cores given (e.g. only --jobs)
        cores = None
    return thread_share(threads, cores)


# ---------------------------------------------------------------------------------------------
# What the Keras jobs ask a scheduler for: memory and wall time from their settings and input
# sizes (allfuse.resources); resources, not params, so they never trigger a rerun.
# ---------------------------------------------------------------------------------------------

KERAS_RULES = {
    "features": "extract_features",
    "study": "tune_backbone",  # tune_worker: the same job shape, one worker of a study
    "member": "train_member",
}


def with_gpu(rule):
    """Whether a GPU rule's jobs run with a GPU: a unit of the local `gpu` resource, or a
    card the profile asks the cluster for (`set-resources: <rule>: {gres: gpu:1}`)."""
    given = workflow.resource_settings.overwrite_resources.get(rule, {})
    asked = {name: getattr(value, "raw", value) for name, value in given.items()}
    return "gpu" in str(asked.get("gres") or "") or int(asked.get("gpu", GPU) or 0) > 0


def _job_shape(kind, wildcards, input):
    study = S.study(wildcards.backbone)
    return shape_of(
        kind,
        S.hybrid(wildcards.backbone),
        dict(input.items()),
        image_size=int(S.data["image_size"]),
        study=study if study.n_trials > 0 else None,
        gpu=with_gpu(KERAS_RULES[kind]),
    )


def memory_of(kind):
    """Resource `mem_mb` of a Keras rule (allfuse.resources.job_memory_mb)."""
    return lambda wildcards, input, attempt: job_memory_mb(
        _job_shape(kind, wildcards, input), attempt
    )


def package_memory(wildcards, input, attempt):
    """Resource `mem_mb` of package_model (allfuse.resources.package_memory_mb)."""
    hybrids = [S.hybrid(b) for b in BACKBONES]
    data_mb = (
        os.path.getsize(input.images) / 1e6 if os.path.isfile(input.images) else 0.0
    )
    return package_memory_mb(hybrids, len(SEEDS), data_mb, attempt)


def package_runtime(wildcards, input, attempt):
    """Resource `runtime` of package_model (allfuse.resources.package_runtime_min)."""
    side = int(S.data["image_size"])
    size = os.path.getsize(input.images) if os.path.isfile(input.images) else 0
    return package_runtime_min(
        [S.hybrid(b) for b in BACKBONES], size // (side * side * 3), attempt
    )


def runtime_of(kind):
    """Resource `runtime` (minutes) of a Keras rule (allfuse.resources.job_runtime_min)."""
    return lambda wildcards, input, attempt: job_runtime_min(
        _job_shape(kind, wildcards, input), attempt
    )
