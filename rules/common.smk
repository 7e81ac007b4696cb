# Helpers shared by the rules: path conventions, input functions and the config slices that
# rules receive through params. No rules here.

from pathlib import Path

from allfuse import config as afc
from allfuse.gpu import gpu_claim, thread_share

RESULTS = "results"
LOGS = "logs"
BENCH = "benchmarks"
SCRIPTS = "../workflow_scripts"

DATASETS = list(config["datasets"])
BACKBONES = list(config["backbones"])
ARCHIVES_NEEDED = afc.archives_needed(config)
USES_DEMO = afc.uses_demo(config)
# GPU jobs claim one unit of `--resources gpu=N` on a host with a GPU, none on a CPU-only host
# (there they run side by side, paced by --cores and mem_mb); ALLFUSE_GPU_JOBS=1/0 overrides.
GPU = gpu_claim()


wildcard_constraints:
    dataset="|".join(afc.DATASETS),
    backbone="|".join(afc.BACKBONES),
    seed=r"\d+",


def _check_archives():
    """Fail at start-up, naming the key, when a configured archive is missing."""
    problems = []
    for name in ARCHIVES_NEEDED:
        path = config["data"]["archives"].get(name)
        if USES_DEMO:
            continue
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


_check_archives()


def archive_input(wildcards):
    """The archive an ingestion job reads: the configured one, or the generated demo."""
    if USES_DEMO:
        return f"{RESULTS}/demo/{wildcards.dataset}.zip"
    return config["data"]["archives"][wildcards.dataset]


def groups_input(wildcards):
    """Slide groups for the grouped split protocol: the user's CSV or the demo's own."""
    if config["data"]["groups_csv"]:
        return [config["data"]["groups_csv"]]
    if USES_DEMO:
        return [f"{RESULTS}/demo/slide_groups.csv"]
    return []


def data_targets():
    return [f"{RESULTS}/splits/{dataset}.json" for dataset in DATASETS]


def member_targets():
    return [
        f"{directory}/run.json"
        for dataset in DATASETS
        for backbone in BACKBONES
        for directory in member_dirs(dataset, backbone)
    ]


def all_targets():
    # The metrics table takes every plot, ensemble and fusion as input: it pulls the whole DAG.
    return data_targets() + member_targets() + [f"{RESULTS}/tables/metrics.csv"]


# ---------------------------------------------------------------------------------------------
# Config slices handed to rules through params (Snakemake's params trigger reruns exactly the
# jobs whose slice changed).
# ---------------------------------------------------------------------------------------------


def settings_of(wildcards):
    """Resolved hybrid settings of one backbone (hybrid defaults + its own block)."""
    return afc.backbone_settings(config, wildcards.backbone)


def features_of(wildcards):
    return afc.feature_settings(config, wildcards.backbone)


def tune_of(wildcards):
    return afc.tune_settings(config, wildcards.backbone)


def study_settings_of(wildcards):
    return afc.study_settings(config, wildcards.backbone)


def mode_of(backbone):
    return afc.backbone_settings(config, backbone)["mode"]


def training_data(wildcards, subsets=("train", "val", "test")):
    """Inputs a model of this backbone trains on: cached features (head) or images (finetune)."""
    if mode_of(wildcards.backbone) == "head":
        base = f"{RESULTS}/features/{wildcards.dataset}/{wildcards.backbone}"
        return {subset: f"{base}/{subset}.npz" for subset in subsets}
    base = f"{RESULTS}/data/{wildcards.dataset}"
    return {"manifest": f"{base}/manifest.csv", "images": f"{base}/images.npy"}


def tuning_data(wildcards):
    # The test subset is not an input of tuning: the study cannot read it.
    return training_data(wildcards, subsets=("train", "val"))


def best_params_input(wildcards):
    if config["tune"]["n_trials"] > 0:
        return [
            f"{RESULTS}/tune/{wildcards.dataset}/{wildcards.backbone}/best_params.json"
        ]
    return []


SEEDS = list(config["ensemble"]["seeds"])


def member_dirs(dataset, backbone):
    return [f"{RESULTS}/members/{dataset}/{backbone}/seed{seed}" for seed in SEEDS]


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
