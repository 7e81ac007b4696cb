"""Which GPU a training job uses, decided before TensorFlow is imported.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once; it never says which
GPU a job should use, so N jobs would all land on GPU 0. ``acquire_gpu`` picks one: it takes the
first free slot among the visible GPUs with an exclusive ``flock`` on ``<lock_dir>/gpu<i>.lock``
and sets ``CUDA_VISIBLE_DEVICES=<i>``. The kernel drops a flock when its process dies, however it
dies, so a crashed job never leaves a slot taken. When every slot stays busy past the timeout
(more GPU jobs than GPUs), the job shares the least-loaded GPU and says so.

A ``CUDA_VISIBLE_DEVICES`` the user or the scheduler already set is respected as it is (no lock).
With no GPU (or no ``nvidia-smi``) the job runs on the CPU and the variable is left alone.

Inside a Slurm job (``SLURM_JOB_ID`` set) the allocator steps aside and says so: the GPU is the one
Slurm allocated (it sets ``CUDA_VISIBLE_DEVICES`` from the job's GRES), and a job Slurm gave no
GPU runs on the CPU with every card hidden, so it never takes one allocated to another job. Lock
files would not help there anyway: their numbers mean different cards on different nodes.

This module never imports TensorFlow, except ``enable_memory_growth``, meant for after import.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

ENV = "CUDA_VISIBLE_DEVICES"
SLURM_JOB = "SLURM_JOB_ID"
_FRAMEWORKS = ("tensorflow", "jax", "torch")


def slurm_job_id() -> str | None:
    """The id of the Slurm job this process runs in, None outside Slurm."""
    return os.environ.get(SLURM_JOB) or None


def count_gpus() -> int:
    """Number of NVIDIA GPUs ``nvidia-smi -L`` lists; 0 when it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        result = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if result.returncode != 0:
        return 0
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


@dataclass
class GpuSlot:
    """The device a job runs on.

    device: "cpu", or "gpu:<ids>" with the physical GPU id(s) as CUDA_VISIBLE_DEVICES names them.
    index: the (first) physical GPU index, or None on CPU or for ids that are not numbers.
    source: "env" (CUDA_VISIBLE_DEVICES was already set), "slurm" (what the Slurm job was
    allocated), "lock" (a slot of our own), "shared" (all slots were busy) or "none" (no GPU).
    """

    device: str
    index: int | None
    source: str
    lock_path: Path | None = None
    _handles: list[IO[str]] = field(default_factory=list, repr=False)
    _share_path: Path | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the slot back (closing the lock files drops their locks). CUDA_VISIBLE_DEVICES
        stays: a framework that already started keeps its device anyway."""
        if self._share_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._share_path.unlink()
            self._share_path = None
        for handle in self._handles:
            with contextlib.suppress(OSError):
                handle.close()
        self._handles.clear()

    @property
    def held(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> GpuSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: Path, exclusive: bool = True) -> IO[str] | None:
    """Open ``path`` and flock it without waiting; the open handle, or None when held elsewhere."""
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _stamp(handle: IO[str]) -> None:
    """Write who holds the lock, for a person looking at the lock folder."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()


def _sharers(lock_dir: Path, index: int) -> int:
    """Live processes sharing GPU ``index``; removes share files whose process died."""
    live = 0
    for path in lock_dir.glob(f"gpu{index}.share.*"):
        probe = _try_lock(path)
        if probe is None:
            live += 1
        else:  # nobody holds it: its process is gone
            probe.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return live


def _set_visible(value: str) -> None:
    started = [name for name in _FRAMEWORKS if name in sys.modules]
    if started:
        log.warning(
            "%s=%s set after %s was imported: it may not take effect; acquire the GPU before importing it",
            ENV,
            value,
            ", ".join(started),
        )
    os.environ[ENV] = value


def _preset_slot(preset: str) -> GpuSlot:
    """The slot a CUDA_VISIBLE_DEVICES the user or scheduler set means (no lock: it is theirs)."""
    ids = [part.strip() for part in preset.split(",") if part.strip()]
    if not ids or ids[0] == "-1":
        return GpuSlot("cpu", None, "env")
    first = ids[0]
    return GpuSlot(f"gpu:{','.join(ids)}", int(first) if first.isdigit() else None, "env")


def _slurm_slot(job: str) -> GpuSlot:
    """The device of a Slurm job: the GPU(s) Slurm allocated, or the CPU with every card hidden."""
    given = os.environ.get(ENV, "")
    slot = _preset_slot(given)
    if slot.device == "cpu":
        _set_visible("")
        log.info("Slurm job %s was allocated no GPU: running on the CPU (lock-file GPU allocation not used "
                 "under Slurm; request a GPU with the rule's gres or gpu resource, see profiles/slurm)", job)  # fmt: skip
    else:
        log.info("Slurm job %s: using the GPU(s) Slurm allocated, %s=%s (lock-file GPU allocation not used "
                 "under Slurm)", job, ENV, given)  # fmt: skip
    return GpuSlot(slot.device, slot.index, "slurm")


def _share_slot(folder: Path, count: int, timeout: float) -> GpuSlot:
    """Every slot stayed busy: share the least-loaded GPU, registered by a share file of our own."""
    loads = [_sharers(folder, index) for index in range(count)]
    index = loads.index(min(loads))
    share = folder / f"gpu{index}.share.{os.getpid()}"
    handle = _try_lock(share)
    if handle is not None:
        _stamp(handle)
    _set_visible(str(index))
    log.warning(
        "all %d GPU slot(s) stayed busy for %.0f s: sharing GPU %d with its holder and %d other job(s); "
        "lower --resources gpu= to the number of GPUs to avoid this",
        count, timeout, index, loads[index],
    )  # fmt: skip
    slot = GpuSlot(f"gpu:{index}", index, "shared", folder / f"gpu{index}.lock", [handle] if handle else [])
    slot._share_path = share if handle is not None else None
    return slot


def acquire_gpu(
    lock_dir: str | Path,
    *,
    timeout: float = 60.0,
    poll: float = 1.0,
    n_gpus: int | None = None,
) -> GpuSlot:
    """Choose this process's GPU and set CUDA_VISIBLE_DEVICES; call before importing TensorFlow.

    lock_dir: a folder shared by all jobs of the workflow (created if missing).
    timeout: seconds to wait for a free slot before sharing the least-loaded GPU.
    poll: seconds between tries while waiting.
    n_gpus: number of GPUs, instead of asking nvidia-smi.
    The slot is held until ``release()`` or the end of the process. Inside a Slurm job the
    device is the one Slurm allocated, with no lock (see the module docstring).
    """
    job = slurm_job_id()
    if job is not None:
        return _slurm_slot(job)
    preset = os.environ.get(ENV)
    if preset is not None:
        return _preset_slot(preset)
    count = count_gpus() if n_gpus is None else int(n_gpus)
    if count <= 0:
        log.info("no GPU found: running on the CPU")
        return GpuSlot("cpu", None, "none")
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        for index in range(count):
            path = folder / f"gpu{index}.lock"
            handle = _try_lock(path)
            if handle is not None:
                _stamp(handle)
                _set_visible(str(index))
                log.info("using GPU %d (lock %s)", index, path)
                return GpuSlot(f"gpu:{index}", index, "lock", path, [handle])
        if time.monotonic() >= deadline:
            return _share_slot(folder, count, timeout)
        time.sleep(max(0.01, poll))


def enable_memory_growth() -> list[str]:
    """Let TensorFlow allocate GPU memory as needed instead of all of it at start (so jobs that
    share a GPU can coexist). Call after importing TensorFlow, before it touches a GPU. Returns
    the GPUs it applied to. Under JAX, asks it not to preallocate (effective before JAX starts)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if "tensorflow" not in sys.modules and os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return []  # another Keras backend: importing TensorFlow would only cost time and memory
    try:
        import tensorflow as tf
    except ImportError:
        return []
    names = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(device, True)
            names.append(device.name)
        except RuntimeError as exc:  # the GPU was initialised already
            log.warning("cannot enable memory growth on %s: %s", device.name, exc)
    return names


def gpu_claim(env: str | None = None) -> int:
    """Units of Snakemake's ``gpu`` resource a GPU job claims by default: 1 on a host with a GPU,
    else 0.

    ``--resources gpu=N`` says how many cards jobs may share at once; on a host without a GPU there
    is no card to share, so the jobs claim none and run on the CPU side by side, paced by
    ``--cores`` and ``mem_mb``. A profile overrides the default per rule with ``set-resources``
    (profiles/slurm asks the cluster for each GPU job's card that way). ``ALLFUSE_GPU_JOBS=1`` /
    ``0`` overrides the detection itself (the test suite sets 0, to run the same on any host).
    """
    value = os.environ.get("ALLFUSE_GPU_JOBS", "auto") if env is None else env
    if value in ("0", "1"):
        return int(value)
    return 1 if count_gpus() > 0 else 0


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_share(threads: int, workflow_cores: int | None, cores: int | None = None) -> int:
    """Compute threads a job should use: its share of this host when ``--cores`` overstates it.

    Snakemake grants ``threads`` out of ``--cores`` without looking at the machine: the default
    profile's ``--cores 8`` on a 2-core host runs two 4-thread jobs at once, and two TensorFlow
    processes with 2 threads each on 2 cores train 30 % slower than with 1 thread each (measured,
    head training). The share is ``threads * cores / workflow_cores`` rounded down (at least 1,
    at most ``cores``); when ``--cores`` does not exceed the host (or is unknown) it is ``threads``
    capped at ``cores``.
    """
    threads = max(1, int(threads))
    cores = host_cores() if cores is None else max(1, int(cores))
    if workflow_cores and int(workflow_cores) > cores:
        threads = (threads * cores) // int(workflow_cores)
    return max(1, min(threads, cores))
