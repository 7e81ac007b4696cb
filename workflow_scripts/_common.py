"""Shared plumbing of the workflow adapters (not part of the library).

Every adapter does three things: unpack the ``snakemake`` object, send logging into the rule's
``log:`` file, and call one ``allfuse`` function. ``run_rule`` does the logging and turns an
``AllfuseError`` (bad input, a damaged intermediate) into one clear line in the log (and on
stderr) with a non-zero exit, instead of a traceback; a job interrupted (Ctrl-C, SIGTERM, or
Snakemake gone: ``allfuse.stages.job_signals``) says so in one line too. Outside Snakemake it
builds the ``snakemake`` object itself (``mock_snakemake``), so any adapter can be run by hand
for debugging:

    python workflow_scripts/make_splits.py dataset=ALL_IDB1 [--configfile my.yaml] [--directory DIR]

``context`` and ``runtime`` turn the object into what the library's stages take: who runs the
stage (rule, wildcards, resolved config, tracking store, this workflow's source tree) and how a
compute job runs (GPU lock folder, thread share, determinism, Keras home).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Make the library importable when a rule runs in an environment where allfuse is not installed
# (e.g. `--sdm conda` with the envs/*.yaml files).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from allfuse import timing, tracking  # noqa: E402
from allfuse.errors import AllfuseError  # noqa: E402
from allfuse.session import Runtime  # noqa: E402
from allfuse.stages import StageContext, StoreInfo, job_signals  # noqa: E402

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _InterruptsWithoutTraceback(logging.Filter):
    """An interrupted job says so in one line (``run_rule``): a library that logs the interrupt
    it passes on (Optuna's failed trial) keeps its message, not the interrupt's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


def setup_logging(log_path: str | os.PathLike[str] | None, level: int = logging.INFO) -> logging.Logger:
    """Send Python logging, warnings and uncaught exceptions to ``log_path`` and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    for handler in handlers:
        handler.addFilter(_InterruptsWithoutTraceback())
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    # Third-party chatter that drowns the rule's own messages.
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "h5py", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("allfuse")

    def excepthook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        log.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    sys.excepthook = excepthook
    return log


def run_rule(main: Callable[[Any, logging.Logger], None], smk: Any, rule: str) -> None:
    """Run an adapter's ``main(snakemake, log)`` with logging set up from the rule's ``log:``;
    ``smk`` None (run by hand) builds the object from the command line first. A job Snakemake
    started stops (as on SIGTERM) when Snakemake is gone."""
    by_hand = smk is None
    smk = standalone(rule) if by_hand else smk
    log = setup_logging(smk.log[0] if len(smk.log) else None)
    log.info("rule %s %s (pid %d)", smk.rule, dict(smk.wildcards.items()), os.getpid())
    # How long tracking calls ride out an unreachable server: a setting of the job's process, read
    # from the config (not a param: changing it reruns nothing).
    tracking.set_retry_seconds(smk.config["tracking"]["retry_seconds"])
    start, main_started = time.perf_counter(), time.time()
    try:
        with job_signals(watch_parent=not by_hand):
            main(smk, log)
    except AllfuseError as exc:
        log.error("%s", exc)
        logging.shutdown()
        sys.exit(1)
    except KeyboardInterrupt as exc:
        log.error("rule %s interrupted (%s) after %.1f s; rerun snakemake to redo this job", smk.rule,
                  exc or "Ctrl-C", time.perf_counter() - start)  # fmt: skip
        logging.shutdown()
        sys.exit(130)
    log.info("rule %s done in %.1f s, peak RSS %.0f MiB; %s", smk.rule, time.perf_counter() - start, peak_rss_mib(),
             timing.job_times(main_started).line())
    if not by_hand:
        exit_now()


def exit_now(code: int = 0) -> None:
    """End a finished job's process at once: logs and streams flushed, then ``os._exit``.

    Every output is complete by now (written whole, then renamed: ``allfuse.files``) and every
    MLflow run ended, so nothing is left for the interpreter's teardown to do but to tear down the
    modules: with TensorFlow loaded that alone cost 1.5-2 s of CPU per job (measured with
    ``/usr/bin/time`` on a Keras fit with and without this), about a minute over the demo's
    48 TensorFlow jobs. Only a job that succeeded leaves this way; failures exit as usual.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM of /proc/self/status (exact, where Snakemake's
    benchmark files sample the job every 30 s once it has run for 15 s). Not getrusage: on Linux
    its ru_maxrss starts from the high-water mark of the process that spawned this one."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS): bytes there
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def context(smk: Any) -> StageContext:
    """The stage's identity: rule, wildcards, the whole resolved config, the tracking store (when
    the rule has one as input), and this workflow's source tree (for the git commit)."""
    store = StoreInfo.read(smk.input.store) if "store" in smk.input.keys() else None
    return StageContext(smk.rule, dict(smk.wildcards.items()), dict(smk.config), store, REPO)


def runtime(smk: Any) -> Runtime:
    """How a compute job runs: GPU slots locked under the rule's folder, TensorFlow threads (the
    rule's ``tf_threads`` resource: its share of this host), determinism, and Keras' cache and
    settings in the working directory's .keras/ (unless KERAS_HOME is set)."""
    share = getattr(smk.resources, "tf_threads", None)
    threads = int(share) if share else int(smk.threads)
    return Runtime(smk.params.gpu_locks, threads, bool(smk.params.deterministic), Path.cwd())


def inputs(smk: Any, *names: str) -> dict[str, str]:
    """The named single-file inputs the rule has, by name (for provenance hashes and data)."""
    return {name: str(smk.input[name]) for name in names if name in smk.input.keys()}


def mock_snakemake(
    rule_name: str,
    configfiles: list[str] | None = None,
    directory: str | os.PathLike[str] | None = None,
    **wildcards: str,
) -> Any:
    """A ``snakemake`` object for ``rule_name`` with ``wildcards``, built from the real workflow.

    Uses Snakemake's API to load the Snakefile (config validation included) and expand the rule's
    input, output, params and log exactly as a scheduled job would, relative to ``directory`` (the
    working directory, as Snakemake's ``--directory``; default the repository). The process moves
    into that directory, so the adapter's relative paths resolve as in a scheduled job.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.dag import DAG
    from snakemake.jobs import Job
    from snakemake.script import Snakemake
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    workdir = Path(directory).resolve() if directory else REPO
    os.chdir(workdir)
    with SnakemakeApi(OutputSettings()) as api:
        settings = ConfigSettings(configfiles=[Path(c).resolve() for c in (configfiles or [])])
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=settings,
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        workflow_api.dag()  # sets the workflow's DAG settings, which DAG() reads
        workflow = workflow_api._workflow
        rule = workflow.get_rule(rule_name)
        dag = DAG(workflow, rules=[rule])
        job = Job(rule, dag, wildcards_dict=wildcards)
        return Snakemake(
            job.input,
            job.output,
            job.params,
            job.wildcards,
            job.threads,
            job.resources,
            job.log,
            workflow.config,
            rule.name,
            None,
        )


def standalone(rule_name: str) -> Any:
    """Parse ``key=value`` wildcards and ``--configfile`` from the command line; build the object."""
    import argparse

    parser = argparse.ArgumentParser(
        description=f"Run the adapter of rule '{rule_name}' outside Snakemake (for debugging).",
        epilog="Example: python workflow_scripts/train_member.py dataset=ALL_IDB2 backbone=mobilenetv2 seed=1",
    )
    parser.add_argument("wildcards", nargs="*", help="wildcard values as name=value")
    parser.add_argument("--configfile", action="append", help="extra config file(s), as for snakemake")
    parser.add_argument("--directory", help="working directory holding results/ (default: the repository)")
    args = parser.parse_args()
    bad = [item for item in args.wildcards if "=" not in item]
    if bad:
        parser.error(f"wildcards must be name=value, got {' '.join(bad)}")
    wildcards = dict(item.split("=", 1) for item in args.wildcards)
    return mock_snakemake(rule_name, configfiles=args.configfile, directory=args.directory, **wildcards)
