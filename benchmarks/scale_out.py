"""Scaling out on one machine: evaluations per hour with 1, 2 and 4 Ray workers spread over two local nodes, two
search drivers on one PostgreSQL study against one, and each storage's per-trial orchestration overhead.

- workers: a two-node `ray.cluster_utils.Cluster` (two cores offered by each node), a real search (untrained
  ResNet-20 on digits, BN recalibration, no latency timing) of `--trials` trials per worker count; the actors are
  started and the base measured before the clock starts.
- drivers: the fake evaluator of tests/fakes.py (it sleeps `--delay` s a trial, so the drivers' own work shows),
  `--trials` trials by one driver, then by two drivers (threads, each its own storage connection) on one study of
  a throwaway PostgreSQL server (tests/postgres_server.py).
- storage: benchmarks/search_orchestration.py, run as it is, once per storage (sqlite, journal, the PostgreSQL
  server's URL); its "ms a trial" line is the per-trial orchestration (sampler, storage, pool).

State the machine's load (`uptime`) beside the figures: on a shared machine they move with it.

Run: python benchmarks/scale_out.py [--parts workers,drivers,storage] [--trials 8] [--delay 0.5]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the fakes and the throwaway PostgreSQL server live with the tests

from fakes import fake_search  # noqa: E402
from postgres_server import missing as postgres_missing  # noqa: E402
from postgres_server import postgres_server  # noqa: E402


def per_hour(trials: int, seconds: float) -> float:
    return 3600.0 * trials / seconds


def workers_part(trials: int) -> None:
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from squeezer.datasets import load_data
    from squeezer.evaluators.evaluate import EvalSettings
    from squeezer.evaluators.pool import PoolConfig, make_pool
    from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
    from squeezer.models import resnet20
    from squeezer.search.config import SearchConfig
    from squeezer.search.study import run_search
    from squeezer.search_job import _base_measurement
    from squeezer.spaces.space import SearchSpace

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    data = load_data("digits")
    torch.manual_seed(0)
    model = resnet20(num_classes=data.num_classes, in_channels=data.in_channels)
    space = SearchSpace.from_model(model, data.example_inputs(), knobs=("prune",))
    settings = EvalSettings(recovery=RecoveryConfig(mode="bn", bn_batches=5), latency=LatencyConfig(mode="none"))
    rates = {}
    try:
        for workers in (1, 2, 4):
            pool = make_pool(model, data, settings, space=space,
                             config=PoolConfig(workers=workers, backend="ray", eval_threads=1))
            try:
                nodes = len(set(ray.get([a.node.remote() for a in pool.actors])))  # type: ignore[attr-defined]
                base = _base_measurement(pool, space.fingerprint)
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    run_search(space, pool, base, out=Path(tmp), workers=workers,
                               config=SearchConfig(budget="macs<=60%", sampler="random", trials=trials, repair=True))
                    wall = time.perf_counter() - start
            finally:
                pool.close()
            rates[workers] = per_hour(trials, wall)
            print(f"workers {workers} on {nodes} node(s): {trials} trials in {wall:.1f} s, "
                  f"{rates[workers]:.0f} evaluations/hour ({rates[workers] / rates[1]:.2f}x one worker)", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


def drivers_part(url: str, trials: int, delay: float) -> None:
    def search(name: str, study: str, n: int, tmp: str, errors: list[BaseException]) -> None:
        try:
            fake_search(str(Path(tmp) / name), trials=n, workers=1, delay=delay, storage=url, study=study,
                        sampler="random")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for drivers in (1, 2):
            errors: list[BaseException] = []
            threads = [threading.Thread(target=search, args=(f"d{drivers}-{i}", f"drivers{drivers}", trials, tmp,
                                                             errors)) for i in range(drivers)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            assert not errors, errors
            rates[drivers] = per_hour(trials, wall)
            print(f"drivers {drivers} on PostgreSQL: {trials} trials of {delay} s in {wall:.1f} s, "
                  f"{rates[drivers]:.0f} evaluations/hour ({rates[drivers] / rates[1]:.2f}x one driver)", flush=True)


def storage_part(storages: list[str], trials: int) -> None:
    for storage in storages:
        run = subprocess.run([sys.executable, str(HERE / "search_orchestration.py"), "--storage", storage,
                              "--trials", str(trials), "--sampler", "random"], capture_output=True, text=True,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        found = re.search(r"and (\d+) ms a trial", run.stdout)
        name = "postgresql" if storage.startswith("postgresql") else storage
        if run.returncode or not found:
            print(f"storage {name}: failed ({run.stderr.strip().splitlines()[-1:] or run.stdout[-200:]})")
            continue
        print(f"storage {name}: {found.group(1)} ms a trial of orchestration ({trials} trials; "
              f"{[ln for ln in run.stdout.splitlines() if ln.startswith('wall')][0]})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="workers,drivers,storage")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--delay", type=float, default=0.5, help="seconds of each fake evaluation (drivers part)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parts = set(args.parts.split(","))
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    # this benchmark's own timing lock: other squeezer runs on the machine do not hold up its timings
    os.environ.setdefault("SQUEEZER_LOCK_DIR", tempfile.mkdtemp(prefix="scale-out-locks-"))
    if "workers" in parts:
        workers_part(args.trials)
    if parts & {"drivers", "storage"}:
        if postgres_missing():
            print(f"PostgreSQL parts skipped: {postgres_missing()}")
            if "storage" in parts:
                storage_part(["sqlite", "journal"], args.trials)
            return
        with postgres_server() as url:
            if "drivers" in parts:
                drivers_part(url, args.trials, args.delay)
            if "storage" in parts:
                storage_part(["sqlite", "journal", url], args.trials)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
