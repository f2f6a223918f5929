"""A search across a two-node Ray cluster on one machine: latency timed on the node holding the device resource,
and a worker node killed mid-search losing no trial and counting none twice."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from optuna.trial import TrialState  # noqa: E402

from squeezer.datasets import load_data  # noqa: E402
from squeezer.evaluators.evaluate import EvalSettings  # noqa: E402
from squeezer.evaluators.pool import PoolConfig, RayPool, make_pool  # noqa: E402
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig  # noqa: E402
from squeezer.models import resnet20  # noqa: E402
from squeezer.search.config import SearchConfig  # noqa: E402
from squeezer.search.records import TrialRecord  # noqa: E402
from squeezer.search.study import run_search  # noqa: E402
from squeezer.search_job import _base_measurement  # noqa: E402
from squeezer.spaces.space import SearchSpace  # noqa: E402

DEVICE = "device:test"
# the head notices a dead node in about a second instead of Ray's default tens of seconds
FAST_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_timeout_ms": 300,
              "health_check_failure_threshold": 3}


@pytest.fixture()
def two_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A head node holding the device resource and a worker node, each offering two cores to evaluations."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # The nodes' processes inherit this: their timing lock is this test's own, not that of whatever else on this
    # machine uses squeezer's machine-wide lock (a timing run waits for all of their torch work).
    monkeypatch.setenv("SQUEEZER_LOCK_DIR", str(tmp_path / "locks"))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {DEVICE: 1}, "include_dashboard": False, "_system_config": FAST_DEATH})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_search_across_two_nodes_survives_losing_one(two_nodes, tmp_path: Path) -> None:
    """12 trials on two workers (one per node), latency timed on the device node; the worker node dies after the
    third trial: its evaluation runs again on a new actor on the head, and the study holds each trial once."""
    cluster, worker = two_nodes
    data = load_data("digits")
    torch.manual_seed(0)
    model = resnet20(num_classes=data.num_classes, in_channels=data.in_channels)
    space = SearchSpace.from_model(model, data.example_inputs(), knobs=("prune",))
    settings = EvalSettings(recovery=RecoveryConfig(mode="none"), latency=LatencyConfig(runs=10, reps=2, warmup=2))
    pool = make_pool(model, data, settings, space=space,
                     config=PoolConfig(workers=2, backend="ray", latency_resource=DEVICE))
    assert isinstance(pool, RayPool)
    head_id = cluster.head_node.node_id
    try:
        nodes = set(ray.get([a.node.remote() for a in pool.actors]))
        assert nodes == {head_id, worker.node_id}  # the evaluations spread over both nodes
        base = _base_measurement(pool, space.fingerprint)
        killed: list[int] = []

        def kill_once(progress) -> None:
            if progress.done >= 3 and not killed:
                killed.append(progress.done)
                cluster.remove_node(worker, allow_graceful=False)

        config = SearchConfig(budget="macs<=70%", sampler="random", trials=12, repair=True)
        result = run_search(space, pool, base, out=tmp_path / "run", config=config, workers=2,
                            on_progress=kill_once)
        assert killed and pool.restarts >= 1  # the node died with an evaluation on it, which ran again elsewhere
    finally:
        pool.close()
    trials = result.study.get_trials(deepcopy=False)
    assert len(trials) == 12 and len({t.number for t in trials}) == 12  # none lost, none twice
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    records = [TrialRecord.from_trial(t) for t in trials if t.state == TrialState.COMPLETE]
    assert len(records) >= 11  # one evaluation at most may fail (a second death), never be recorded twice
    # every candidate was timed by the one actor on the device node, and says so
    assert {r.hardware.get("ray_node") for r in records} == {head_id} and base.hardware["ray_node"] == head_id
