# Helpers shared by the rules: path conventions, input functions and the config slices that
# rules receive through params. No rules here.

from pathlib import Path

from allfuse import config as afc

RESULTS = "results"
LOGS = "logs"
BENCH = "benchmarks"
SCRIPTS = "../workflow_scripts"

DATASETS = list(config["datasets"])
BACKBONES = list(config["backbones"])
ARCHIVES_NEEDED = afc.archives_needed(config)
USES_DEMO = afc.uses_demo(config)


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


def all_targets():
    return data_targets()
