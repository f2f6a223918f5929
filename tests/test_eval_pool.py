"""Pools: every submitted policy comes back, a killed worker's evaluation is retried, latency can run on a
Ray node that carries a device resource."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
import torch
from fakes import BrokenModel

from squeezer.evaluators.evaluate import EvalSettings
from squeezer.evaluators.measurement import EvalFailure, Measurement
from squeezer.evaluators.pool import LocalPool, PoolConfig, make_pool
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.models import resnet20
from squeezer.policies.policy import LayerChoice, Policy

FAST = EvalSettings(recovery=RecoveryConfig(bn_batches=2), latency=LatencyConfig(mode="none"))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet20(num_classes=10, in_channels=1)


def _policies():
    return [Policy(), Policy(layers={"layer1.0.conv1": LayerChoice(prune=0.5)}),
            Policy(layers={"nope": LayerChoice(prune=0.5)})]


def _drain(pool, timeout=120.0):
    out, deadline = {}, time.time() + timeout
    while pool.pending() and time.time() < deadline:
        out.update(pool.wait(timeout=5))
    return out


def test_inline_pool_returns_everything(digits) -> None:
    pool = make_pool(_net(), digits, FAST, config=PoolConfig(workers=1, backend="auto"))
    assert isinstance(pool, LocalPool) and pool.in_process
    for i, p in enumerate(_policies()):
        pool.submit(i, p)
    out = _drain(pool)
    pool.close()
    assert isinstance(out[0], Measurement) and isinstance(out[1], Measurement) and isinstance(out[2], EvalFailure)


@pytest.mark.slow
def test_local_pool_two_workers_and_killed_worker_retried(digits) -> None:
    pool = LocalPool(_net(), digits, FAST, config=PoolConfig(workers=2))
    try:
        # both workers start with the pool, not the second one only once a search is under way
        assert len(pool.worker_pids()) == 2 and not pool.in_process
        for i, p in enumerate(_policies()):
            pool.submit(i, p)
        out = _drain(pool)
        assert sorted(out) == [0, 1, 2] and isinstance(out[1], Measurement)
        pool.submit(10, Policy(layers={"layer2.0.conv1": LayerChoice(prune=0.25)}))
        # Kill at once: an evaluation is quick, so any wait here could let it finish before the kill.
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        out = _drain(pool)
        assert isinstance(out[10], Measurement) and pool.restarts == 1 and len(pool.worker_pids()) == 2
    finally:
        pool.close()


@pytest.mark.slow
def test_local_workers_killed_while_idle_or_unable_to_start(digits, tmp_path) -> None:
    pool = LocalPool(_net(), digits, FAST, config=PoolConfig(workers=2))
    try:
        pool.submit(0, Policy())
        assert isinstance(_drain(pool)[0], Measurement)
        for pid in pool.worker_pids():  # killed between evaluations: the next submit starts the pool again
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        pool.submit(1, Policy(layers={"layer1.0.conv1": LayerChoice(prune=0.5)}))
        assert isinstance(_drain(pool)[1], Measurement) and pool.restarts == 1
    finally:
        pool.close()
    # each worker fails to trace it: a reason, not a crash
    pool = LocalPool(BrokenModel(), digits, FAST, config=PoolConfig(workers=2))
    try:
        pool.submit(0, Policy())
        out = _drain(pool)
        assert isinstance(out[0], EvalFailure) and "could not build its evaluator" in out[0].reason
        assert "broken on purpose" in out[0].reason and pool.restarts == 0
    finally:
        pool.close()


def test_a_ray_actor_that_cannot_build_its_evaluator_fails_each_evaluation_with_the_reason(digits, tmp_path):
    pytest.importorskip("ray")
    from squeezer.evaluators.ray_actors import EvalActor

    actor = EvalActor(BrokenModel(), digits, FAST)  # the class itself, as Ray would build it
    out = actor.evaluate(Policy())
    assert isinstance(out, EvalFailure) and "could not build its evaluator" in out.reason
    assert "broken on purpose" in out.reason


def test_unknown_backend_and_unreachable_address(digits) -> None:
    with pytest.raises(ValueError, match="unknown pool backend 'dask': choose from auto, local, ray"):
        PoolConfig(backend="dask")
    with pytest.raises(ValueError, match="workers must be at least 1"):
        PoolConfig(workers=0)
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="ray start --head"):
        make_pool(_net(), digits, FAST, config=PoolConfig(workers=2, backend="ray", ray_address="127.0.0.1:1"))


def test_default_pool_size_is_one_worker_per_core_and_one_per_gpu() -> None:
    import torch

    from squeezer.evaluators.pool import default_workers

    assert default_workers() == (os.cpu_count() or 1)
    assert default_workers("cuda") == max(1, torch.cuda.device_count())


def test_cuda_workers_each_get_a_gpu_of_their_own(monkeypatch) -> None:
    """Local worker processes take the GPUs in turn; Ray actors ask Ray for one (a share of one when there are
    more workers than GPUs), so Ray sets each actor's visible GPU and never places it on a node without one."""
    import multiprocessing as mp

    import torch

    from squeezer.evaluators import pool as pool_module

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(pool_module, "worker_evaluator", lambda *args, **kwargs: None)
    started = mp.get_context("spawn").Value("i", 0)
    threads = torch.get_num_threads()
    for _ in range(3):
        pool_module._init_worker("resnet20", "digits", EvalSettings(device="cuda"), None, None, threads, started)
    assert chosen == [0, 1, 0]
    pool_module._init_worker("resnet20", "digits", EvalSettings(), None, None, threads, started)  # cpu: no GPU
    assert chosen == [0, 1, 0]

    assert pool_module.actor_resources("cpu", 4, 0) == {"num_cpus": 1}
    assert pool_module.actor_resources("cuda", 2, 4) == {"num_cpus": 1, "num_gpus": 1.0}
    assert pool_module.actor_resources("cuda", 4, 2) == {"num_cpus": 1, "num_gpus": 0.5}
    assert pool_module.actor_resources("cuda", 4, 3) == {"num_cpus": 1, "num_gpus": 0.5}  # packs: 6 halves for 4
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        pool_module.actor_resources("cuda", 2, 0)


def test_auto_pool_evaluates_locally_when_ray_cannot_start(digits, monkeypatch, caplog) -> None:
    import squeezer.evaluators.pool as pool_module

    pytest.importorskip("ray")
    def broken(*args, **kwargs):
        raise RuntimeError("raylet failed to start")

    monkeypatch.setattr(pool_module, "RayPool", broken)
    pool = make_pool(_net(), digits, FAST, config=PoolConfig(workers=2, backend="auto"))
    try:
        assert isinstance(pool, LocalPool) and pool.workers == 2
        assert "Ray did not start (RuntimeError: raylet failed to start)" in caplog.text
    finally:
        pool.close()
    with pytest.raises(RuntimeError):  # asked for by name, Ray's failure is the user's to see
        make_pool(_net(), digits, FAST, config=PoolConfig(workers=2, backend="ray"))


@pytest.mark.slow
def test_ray_pool_retries_killed_actor(digits) -> None:
    pytest.importorskip("ray")
    pool = make_pool(_net(), digits, FAST, config=PoolConfig(workers=2, backend="ray"))
    try:
        for i, p in enumerate(_policies()):
            pool.submit(i, p)
        # one evaluation per actor; the third policy waits in the pool for whichever actor is idle first
        assert pool.pending() == 3 and sorted(v[3] for v in pool._inflight.values()) == [0, 1]
        first = _drain(pool)
        assert sorted(first) == [0, 1, 2] and isinstance(first[2], EvalFailure)
        pid = pool.actor_pids()[0]
        pool.submit(5, Policy(layers={"layer3.0.conv1": LayerChoice(prune=0.5)}))
        pool.submit(6, Policy(layers={"layer3.1.conv1": LayerChoice(prune=0.5)}))
        os.kill(pid, signal.SIGKILL)
        out = _drain(pool)
        assert isinstance(out[5], Measurement) and isinstance(out[6], Measurement) and pool.restarts == 1
        # the private instance has no dashboard: its actors, the replacement too, report no task events to it
        assert [getattr(a, "_ray_enable_task_events", None) for a in pool.actors] == [False, False]
    finally:
        pool.close()


@pytest.mark.slow
def test_ray_latency_runs_on_device_node(digits) -> None:
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    device = cluster.add_node(num_cpus=0, resources={"device:test": 1})  # as the README starts a device: no CPUs
    try:  # offered, so no evaluation is placed there, and the pool defaults to one worker per CPU offered
        settings = replace(FAST, latency=LatencyConfig(mode="measure"))
        config = PoolConfig(workers=None, backend="ray", ray_address=cluster.address, latency_resource="device:test")
        pool = make_pool(_net(), digits, settings, config=config)
        assert pool.workers == 2
        pool.submit(0, Policy())
        out = _drain(pool)[0]
        assert isinstance(out, Measurement) and out.latency_source == "measured" and out.latency_ms > 0
        assert out.hardware["ray_node"] == device.node_id
        assert ray.get(pool.latency_actor.count.remote()) == 1
        pool.close()
    finally:
        ray.shutdown()
        cluster.shutdown()


USER_MODULE = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.conv(x))


def net(num_classes=10, in_channels=1):
    return Net(num_classes, in_channels)
'''


def test_a_module_function_model_from_the_current_folder_builds_here_and_in_workers(digits, tmp_path,
                                                                                    monkeypatch) -> None:
    """`squeezer` is a console script: the folder it runs in is not on sys.path, yet `--model mynets:net` names a
    file there (as `uvicorn module:app` does). Worker processes unpickle the model's class from it too."""
    import sys

    from squeezer.models import build_model

    (tmp_path / "squeezer_user_nets.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    model = build_model("squeezer_user_nets:net", num_classes=10, in_channels=1)
    assert type(model).__module__ == "squeezer_user_nets" and str(tmp_path) in os.environ["PYTHONPATH"]
    pool = LocalPool(model, digits, FAST, config=PoolConfig(workers=2))
    try:
        pool.submit(0, Policy(layers={"conv.0": LayerChoice(prune=0.5)}))
        out = _drain(pool)
    finally:
        pool.close()
        sys.modules.pop("squeezer_user_nets", None)
    assert isinstance(out[0], Measurement), out[0]
