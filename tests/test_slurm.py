"""The workflow on a real Slurm cluster: Debian's slurmctld, slurmd and munge on this machine,
started by services/slurm.sh (one node, one GPU GRES backed by /dev/null, no accounting
database, memory enforced), driven by `snakemake --profile profiles/slurm`.

A reduced micro config (one dataset, MobileNetV2 only, a one-trial study, one member) runs end
to end: every TensorFlow job ran as a Slurm job (its MLflow run, and every other run, carries the
Slurm job id), the three GPU rules asked Slurm for a GPU and used the CUDA_VISIBLE_DEVICES Slurm
set, the light rules asked for none, every job declared memory Slurm enforced and survived, and a
second invocation schedules nothing. The test fails, never skips, when Slurm cannot start.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from allfuse import tags as T
from allfuse import tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SLURM_SH = REPO / "services" / "slurm.sh"
PROFILE = REPO / "profiles" / "slurm"
# Test-only overrides of the profile: one core per job (the node has this machine's 2 cores, the
# Keras rules ask for 4 threads) and quick status checks (the profile's 40 s before the first and
# Snakemake's 10 s between rounds suit a real queue, not a test of 12 short jobs one after another;
# the cluster's MinJobAge is 12 h, so squeue still sees every finished job).
OVERRIDES = ("--max-threads", "1", "--slurm-init-seconds-before-status-checks", "2",
             "--seconds-between-status-checks", "1")  # fmt: skip
KERAS_RULES = ("extract_features", "tune_backbone", "train_member")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm cluster (installed when missing); its SLURM_CONF."""
    state = tmp_path_factory.mktemp("slurm")
    try:
        out = subprocess.run([str(SLURM_SH), "start", str(state)], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            pytest.fail(f"Slurm did not start (services/slurm.sh start):\n{out.stdout}\n{out.stderr}")
        yield str(state / "etc" / "slurm.conf")
    finally:
        subprocess.run([str(SLURM_SH), "stop", str(state)], capture_output=True, text=True, timeout=120)


def slurm_micro(smk) -> dict:
    """The micro config cut to what the Slurm path needs: every rule, one Keras job of each kind."""
    config = smk.micro()
    config["demo"]["idb2_per_class"] = 12
    config["backbones"] = {"mobilenetv2": {"input_size": 32}}
    config["ensemble"]["seeds"] = [1]
    config["hybrid"].update(epochs=2, patience=2)
    config["tune"].update(n_trials=1, epochs=1)
    return config


def slurm_cli(conf: str, *args: str) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, env={"SLURM_CONF": conf, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
    return out.stdout


def slurm_jobs(conf: str) -> dict[str, dict[str, str]]:
    """Every job the cluster ran, finished ones included: id -> rule or group of rules (from the
    comment the executor gives each job), state, GPUs asked for, memory asked for."""
    jobs = {}
    for line in slurm_cli(conf, "squeue", "--states=all", "--noheader", "--format=%i|%k").splitlines():
        job, comment = line.split("|", 1)
        details = slurm_cli(conf, "scontrol", "show", "job", job)
        rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
        jobs[job] = {"rule": rule.group(1) if rule else comment, "state": field(details, "JobState"),
                     "tres": field(details, "TresPerNode"), "mem": field(details, "MinMemoryNode")}  # fmt: skip
    return jobs


def field(text: str, name: str) -> str:
    found = re.search(rf"\b{name}=(\S*)", text)
    return found.group(1) if found else ""


@pytest.fixture(scope="module")
def slurm_run(slurm, smk, tmp_path_factory):
    """The reduced micro DAG run through the Slurm profile: (workdir, wall seconds, output)."""
    workdir = tmp_path_factory.mktemp("slurm_dag")
    smk.write_config(workdir, slurm_micro(smk))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", slurm)
        start = time.perf_counter()
        out = smk.run_checked(workdir, "--profile", str(PROFILE), *OVERRIDES, timeout=1500)
        wall = time.perf_counter() - start
        again = smk.scheduled(workdir, "--profile", str(PROFILE), *OVERRIDES)
    print(f"\nmicro DAG through Slurm: {wall:.0f} s wall")
    return workdir, wall, out.stdout + out.stderr, again


def runs_of(workdir: Path) -> list:
    store = yaml.safe_load((workdir / "results" / "mlflow" / "store.json").read_text())
    return tracking.client(store["uri"]).search_runs([store["experiment_id"]], max_results=1000)


def test_every_run_carries_the_slurm_job_it_ran_as(slurm_run, slurm):
    workdir = slurm_run[0]
    jobs = slurm_jobs(slurm)
    runs = runs_of(workdir)
    assert {r.data.tags[T.LEVEL] for r in runs} == set(T.LEVELS)
    assert {r.info.run_name: T.check_tags(r.data.tags) for r in runs if T.check_tags(r.data.tags)} == {}
    for run in runs:
        job = run.data.tags.get(T.SLURM_JOB)
        assert job in jobs, f"{run.info.run_name}: Slurm job {job!r} is not one the cluster ran"
        if run.data.tags[T.LEVEL] in ("trial", "member"):
            assert jobs[job]["rule"] in KERAS_RULES
        if run.data.tags[T.LEVEL] == "study":  # a one-worker study: one job tunes and writes its tables
            assert jobs[job]["rule"] == "tune_backbone"
        if run.data.tags[T.LEVEL] in ("trial", "member"):  # the device the job used: Slurm's card
            assert run.data.tags[T.DEVICE] == "gpu:0", run.info.run_name


def test_gpu_rules_asked_slurm_for_a_gpu_and_used_its_cuda_visible_devices(slurm_run, slurm):
    workdir = slurm_run[0]
    jobs = slurm_jobs(slurm)
    names = {j["rule"] for j in jobs.values()}
    assert names >= set(KERAS_RULES) and names - set(KERAS_RULES), names  # light jobs too (grouped by the profile)
    for job, info in jobs.items():
        asked = "gpu" in info["tres"]
        assert asked == (info["rule"] in KERAS_RULES), f"job {job} ({info['rule']}) TresPerNode={info['tres']}"
    logs = [next((workdir / "logs").rglob(pattern)) for pattern in
            ("features/**/mobilenetv2.log", "tune/**/mobilenetv2/worker0.log", "members/**/seed1.log")]  # fmt: skip
    for log in logs:
        text = log.read_text()
        found = re.search(r"Slurm job (\d+): using the GPU\(s\) Slurm allocated, CUDA_VISIBLE_DEVICES=0", text)
        assert found, f"{log} does not say it used the GPU Slurm allocated:\n{text[:2000]}"
        assert jobs[found.group(1)]["rule"] in KERAS_RULES


def test_every_job_declared_memory_slurm_enforced_and_completed(slurm_run, slurm):
    workdir = slurm_run[0]
    jobs = slurm_jobs(slurm)
    assert jobs
    for job, info in jobs.items():
        assert info["state"] == "COMPLETED", f"job {job} ({info['rule']}): {info['state']}"
        assert re.fullmatch(r"\d+M", info["mem"]), f"job {job} ({info['rule']}) declared no memory: {info['mem']}"
    # Each Keras job's peak RSS (Snakemake's benchmark file of the job, sampled every 0.5 s in a
    # job's first 30 s) sits well inside what it declared.
    declared = {info["rule"]: int(info["mem"][:-1]) for info in jobs.values() if info["rule"] in KERAS_RULES}
    stats = {"extract_features": "features", "tune_backbone": "tune", "train_member": "members"}
    for rule, folder in stats.items():
        (tsv,) = (workdir / "jobstats" / folder).rglob("*.tsv")
        header, row = tsv.read_text().splitlines()[:2]
        peak = float(dict(zip(header.split("\t"), row.split("\t")))["max_rss"])
        assert 1.1 * peak <= declared[rule], f"{rule}: peak {peak:.0f} MB, declared {declared[rule]} MB"


def test_job_states_came_from_squeue_and_a_second_invocation_schedules_nothing(slurm_run):
    output = slurm_run[2]
    assert "Falling back to 'sacct'" not in output and "sacct' unavailable" not in output
    assert slurm_run[3] == {}
