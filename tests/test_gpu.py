"""GPU slots: respect a preset CUDA_VISIBLE_DEVICES, lock one free GPU per process, share when full."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from allfuse import gpu


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    """These tests run as if outside a Slurm job, wherever the suite runs."""
    monkeypatch.delenv(gpu.SLURM_JOB, raising=False)


@pytest.fixture
def no_preset(monkeypatch):
    """No CUDA_VISIBLE_DEVICES at start; whatever acquire_gpu sets is undone after the test."""
    monkeypatch.delenv(gpu.ENV, raising=False)


def test_preset_visible_devices_are_respected_without_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu.ENV, "1")
    slot = gpu.acquire_gpu(tmp_path / "locks", n_gpus=4)
    assert (slot.device, slot.index, slot.source) == ("gpu:1", 1, "env")
    assert not (tmp_path / "locks").exists()
    monkeypatch.setenv(gpu.ENV, "2,3")
    assert gpu.acquire_gpu(tmp_path, n_gpus=4).device == "gpu:2,3"
    for hidden in ("", "-1"):
        monkeypatch.setenv(gpu.ENV, hidden)
        slot = gpu.acquire_gpu(tmp_path, n_gpus=4)
        assert (slot.device, slot.index) == ("cpu", None)
        assert os.environ[gpu.ENV] == hidden


def test_inside_a_slurm_job_the_allocated_gpu_is_used_without_a_lock_and_the_log_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gpu.SLURM_JOB, "4242")
    monkeypatch.setenv(gpu.ENV, "0")
    with caplog.at_level("INFO", logger="allfuse.gpu"):
        slot = gpu.acquire_gpu(tmp_path / "locks", n_gpus=4)
    assert (slot.device, slot.index, slot.source) == ("gpu:0", 0, "slurm")
    assert not (tmp_path / "locks").exists() and not slot.held
    assert "Slurm job 4242: using the GPU(s) Slurm allocated, CUDA_VISIBLE_DEVICES=0" in caplog.text
    assert "lock-file GPU allocation not used" in caplog.text


def test_a_slurm_job_given_no_gpu_runs_on_the_cpu_with_the_nodes_cards_hidden(tmp_path, no_preset, monkeypatch, caplog):
    monkeypatch.setenv(gpu.SLURM_JOB, "4243")
    monkeypatch.setattr(gpu, "count_gpus", lambda: 2)  # the node has cards; Slurm gave this job none
    with caplog.at_level("INFO", logger="allfuse.gpu"):
        slot = gpu.acquire_gpu(tmp_path / "locks")
    assert (slot.device, slot.source) == ("cpu", "slurm")
    assert os.environ[gpu.ENV] == ""
    assert not (tmp_path / "locks").exists()
    assert "Slurm job 4243 was allocated no GPU: running on the CPU" in caplog.text


def test_no_gpu_means_cpu_and_environment_untouched(tmp_path, no_preset, monkeypatch):
    monkeypatch.setattr(gpu, "count_gpus", lambda: 0)
    slot = gpu.acquire_gpu(tmp_path)
    assert (slot.device, slot.index, slot.source) == ("cpu", None, "none")
    assert gpu.ENV not in os.environ


def test_count_gpus_reads_nvidia_smi_and_missing_binary_is_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu.count_gpus() == 0
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"\n'
        'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"\n'
    )
    fake.chmod(0o755)
    assert gpu.count_gpus() == 2
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert gpu.count_gpus() == 0


def test_slots_are_exclusive_then_shared_least_loaded(tmp_path, no_preset, monkeypatch):
    def take(**kwargs):
        monkeypatch.delenv(gpu.ENV, raising=False)
        return gpu.acquire_gpu(tmp_path, n_gpus=2, **kwargs)

    first, second = take(), take()
    assert (first.index, second.index) == (0, 1)
    assert first.source == second.source == "lock"
    assert os.environ[gpu.ENV] == "1"
    assert str(os.getpid()) in (tmp_path / "gpu0.lock").read_text()
    third = take(timeout=0.05, poll=0.01)
    fourth = take(timeout=0.05, poll=0.01)
    assert (third.source, third.index) == ("shared", 0)
    assert (fourth.source, fourth.index) == ("shared", 1)  # GPU 0 already had a sharer
    third.release()
    assert take(timeout=0, poll=0.01).index == 0  # the sharer left GPU 0
    with first:
        pass  # leaving the context releases the slot
    assert not first.held
    again = take()
    assert (again.source, again.index) == ("lock", 0)
    for slot in (second, fourth, again):
        slot.release()


CHILD = textwrap.dedent("""
    import os, sys
    from allfuse import gpu

    slot = gpu.acquire_gpu(sys.argv[1], n_gpus=2, timeout=0)
    print(slot.index, slot.source, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    sys.stdin.read()  # hold the slot until the parent closes stdin or kills us
    """)


def _start(script, lock_dir, env):
    proc = subprocess.Popen(
        [sys.executable, str(script), str(lock_dir)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    index, source, visible = proc.stdout.readline().split()
    return proc, int(index), source, visible


def test_two_processes_get_different_gpus_and_a_dead_process_frees_its_slot(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != gpu.ENV}
    locks = tmp_path / "locks"
    a, a_index, a_source, a_visible = _start(script, locks, env)
    b, b_index, b_source, b_visible = _start(script, locks, env)
    try:
        assert {a_index, b_index} == {0, 1}
        assert (a_source, b_source) == ("lock", "lock")
        assert (a_visible, b_visible) == (str(a_index), str(b_index))
        a.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the flock
        a.wait(timeout=30)
        c, c_index, c_source, _ = _start(script, locks, env)
        try:
            assert (c_index, c_source) == (a_index, "lock")
        finally:
            c.stdin.close()
            c.wait(timeout=30)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=30)


def test_enable_memory_growth_applies_to_every_visible_gpu_and_survives_a_started_one(monkeypatch):
    import types

    import tensorflow as tf

    devices = [types.SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(3)]
    grown = []

    def set_memory_growth(device, enable):
        if device.name.endswith("2"):
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        grown.append((device.name, enable))

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: devices if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", set_memory_growth)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    applied = gpu.enable_memory_growth()
    assert applied == [d.name for d in devices[:2]] and grown == [(d.name, True) for d in devices[:2]]
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # JAX, should it be the backend


@pytest.mark.parametrize(
    ("threads", "workflow_cores", "cores", "expected"),
    [
        (4, 8, 2, 1),  # the default profile's --cores 8 on a 2-core host: two jobs, one core each
        (4, 2, 2, 2),  # --cores 2: Snakemake already capped the job at the host
        (2, 8, 2, 1),
        (4, 8, 16, 4),  # a host larger than --cores: the granted threads
        (4, None, 2, 2),  # --cores unknown: capped at the host
        (1, 64, 2, 1),  # never below one thread
        (8, 12, 6, 4),
    ],
)
def test_thread_share_is_the_jobs_part_of_the_host(threads, workflow_cores, cores, expected):
    assert gpu.thread_share(threads, workflow_cores, cores) == expected


def test_host_cores_is_positive_and_within_cpu_count():
    assert 1 <= gpu.host_cores() <= (os.cpu_count() or 1)
