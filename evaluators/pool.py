"""Evaluator pools: many policies evaluated at once, each worker holding one Evaluator built once.

One interface (`EvalPool`: submit / wait / pending / close), two implementations: `LocalPool` (spawned worker
processes, no Ray; one worker runs in-process) and `RayPool` (Ray actors, on this machine or a cluster, with
latency optionally timed on a node carrying a custom resource such as "device:pi4"). A worker that dies in the
middle of an evaluation is replaced and its evaluation retried once; a second death is an EvalFailure. Ray is
imported only inside RayPool, so machines without it (the GPU test machine) use LocalPool.

Workers share the cores: each sets torch to `PoolConfig.eval_threads` threads (else OMP_NUM_THREADS when set, else
cores // workers), and timing is serialised machine-wide by the lock in `latency.py` (torch work shared, timing
exclusive).
"""
from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Mapping, Protocol

import multiprocessing as mp
import torch
from torch import nn

from squeezer.evaluators.data import DataBundle
from squeezer.evaluators.evaluate import EvalSettings, Evaluator, worker_evaluator
from squeezer.evaluators.measurement import EvalFailure, Outcome
from squeezer.evaluators.ray_cluster import check_reachable, describe_cluster, load_runtime_env, resolve_address
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

__all__ = ["BACKENDS", "EvalPool", "LocalPool", "PoolConfig", "RayPool", "actor_resources", "cluster_workers",
           "default_workers", "make_pool"]

RETRIES = 1
BACKENDS = ("auto", "local", "ray")
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Where and how many evaluations run. `workers` None: one per core (one per GPU with device 'cuda'), of the
    cluster `ray_address` names when it names one. `backend` "local" (processes), "ray" (actors), or "auto" (Ray
    when importable and there is more than one worker, a Ray address or a latency resource). `latency_resource`:
    the custom Ray resource of the node that times latency (the target device). `ray_address` None honours
    RAY_ADDRESS as `ray.init()` does. `runtime_env`: Ray's runtime_env (working_dir, py_modules, ...) that ships
    the user's code, such as a `module:function` model or a dataset class, to every node. `cache_dir`: where evaluations
    and the latency table are kept on disk (none: in memory only). `eval_threads`: torch threads per worker
    (None: OMP_NUM_THREADS when set, else cores // workers); on a busy machine one thread per worker can be far
    faster than several, whose OpenMP barriers wait on a core another process holds."""

    workers: int | None = None
    backend: str = "auto"
    ray_address: str | None = None
    latency_resource: str | None = None
    cache_dir: str | Path | None = None
    eval_threads: int | None = None
    runtime_env: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.eval_threads is not None and self.eval_threads < 1:
            raise ValueError(f"eval_threads must be at least 1 (or None for OMP_NUM_THREADS or cores / workers), "
                             f"got {self.eval_threads}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1 (or None for one per core), got {self.workers}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown pool backend {self.backend!r}: choose from {', '.join(BACKENDS)}")


class EvalPool(Protocol):
    workers: int

    def submit(self, key: int, policy: Policy) -> None: ...

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]: ...

    def pending(self) -> int: ...

    def close(self) -> None: ...


def threads_per_worker(workers: int, eval_threads: int | None = None) -> int:
    """Torch threads for each of `workers` evaluators: the user's number, else OMP_NUM_THREADS (as torch itself
    honours it), else an equal share of the cores."""
    if eval_threads is not None:
        return eval_threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def default_workers(device: str = "cpu") -> int:
    """How many workers a pool gets when the user names no number: one per core, each evaluating on one thread
    (small models use many cores better side by side than as one worker's intra-op threads; on 2 cores the gain is
    small, see benchmarks/RESULTS.md), or one per GPU with device 'cuda'."""
    if device == "cuda":
        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)


# ---- local processes -------------------------------------------------------------------------------------------------
_WORKER: Evaluator | EvalFailure | None = None


def _init_worker(model: Any, data: Any, settings: EvalSettings, space: SearchSpace | None,
                 cache_dir: str | Path | None, threads: int, started: Any = None) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    if settings.device == "cuda" and started is not None and torch.cuda.is_available():
        with started.get_lock():  # the workers take the GPUs in turn, not all the first one
            ordinal, started.value = started.value, started.value + 1
        torch.cuda.set_device(ordinal % torch.cuda.device_count())
    _WORKER = worker_evaluator(model, data, settings, space=space, cache_dir=cache_dir)


def _worker_ready() -> int:
    return os.getpid()


def _evaluate_in_worker(policy: Policy) -> Outcome:
    assert _WORKER is not None, "worker initializer did not run"
    return _WORKER if isinstance(_WORKER, EvalFailure) else _WORKER.evaluate(policy)


class LocalPool:
    """Worker processes (spawn context), each building its Evaluator once in the initializer.

    `workers=1` evaluates in the calling process (no start-up cost, same results). A broken process pool (a worker
    killed) is rebuilt and the evaluations it held are retried once. A worker that cannot build its Evaluator fails
    each evaluation it is handed, with the reason. `space`, the model's traced SearchSpace, saves each worker
    tracing the model again.
    """

    def __init__(self, model: nn.Module, data: DataBundle, settings: EvalSettings = EvalSettings(), *,
                 config: PoolConfig = PoolConfig(workers=1), space: SearchSpace | None = None) -> None:
        self.workers = config.workers or default_workers(settings.device)
        data = data.without_test()
        self.init_args = (model, data, settings, space, config.cache_dir,
                          threads_per_worker(self.workers, config.eval_threads))
        self._queue: deque[tuple[int, Policy]] = deque()
        self._futures: dict[Future, tuple[int, Policy, int]] = {}
        self._failed: list[tuple[int, Outcome]] = []  # given up on while submitting, returned by the next wait
        self._executor: ProcessPoolExecutor | None = None
        self.evaluator: Evaluator | None = None
        self.restarts = 0
        self.description = (f"evaluating in {self.workers} local process{'es' * (self.workers > 1)}"
                            if self.workers > 1 else "evaluating in this process")
        if self.workers == 1:
            torch.set_num_threads(threads_per_worker(1, config.eval_threads))
            self.evaluator = Evaluator(model, data, settings, space=space, cache_dir=config.cache_dir)
        else:
            self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        """A process pool whose workers start now, side by side, rather than one by one as evaluations arrive:
        Python spawns a worker only when no started one is idle, so the second worker's start (importing torch,
        loading model and data: seconds) used to fall inside the search, while the first worker waited idle."""
        context = mp.get_context("spawn")
        executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker,
                                       initargs=(*self.init_args, context.Value("i", 0)))
        for _ in range(self.workers):
            executor.submit(_worker_ready)
        return executor

    @property
    def in_process(self) -> bool:
        """True when evaluations run in the calling process (inside `wait`), so queueing ahead gains nothing."""
        return self._executor is None

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for tests that kill one)."""
        return list(getattr(self._executor, "_processes", {}) or {})

    def submit(self, key: int, policy: Policy) -> None:
        if self._executor is None:
            self._queue.append((key, policy))
            return
        try:
            future = self._executor.submit(_evaluate_in_worker, policy)
        except BrokenProcessPool:  # a worker died between evaluations: start the pool again
            self._failed += self._restart([])
            future = self._executor.submit(_evaluate_in_worker, policy)  # type: ignore[union-attr]
        self._futures[future] = (key, policy, 0)

    def pending(self) -> int:
        return len(self._queue) + len(self._futures) + len(self._failed)

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        """Finished (key, outcome) pairs: at least one unless nothing is pending or `timeout` passes."""
        if self._executor is None:
            if not self._queue:
                return []
            key, policy = self._queue.popleft()
            return [(key, self.evaluator.evaluate(policy))]  # type: ignore[union-attr]
        results, self._failed = self._failed, []
        while self._futures and not results:
            done, _ = wait_futures(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                break
            retry: list[tuple[int, Policy, int]] = []
            for future in done:
                key, policy, attempts = self._futures.pop(future)
                try:
                    results.append((key, future.result()))
                except BrokenProcessPool:
                    retry.append((key, policy, attempts))
                except Exception as exc:  # pickling errors and the like: a value, not a crash
                    results.append((key, EvalFailure(f"worker error {type(exc).__name__}: {exc}"[:300])))
            if retry:
                results += self._restart(retry)
        return results

    def _restart(self, retry: list[tuple[int, Policy, int]]) -> list[tuple[int, Outcome]]:
        """Rebuild the broken pool and resubmit everything it held (each key retried at most RETRIES times)."""
        failed: list[tuple[int, Outcome]] = []
        held = list(retry)
        for future, value in list(self._futures.items()):
            if not (future.done() and future.exception() is None):  # a finished one keeps its result to collect
                held.append(value)
                del self._futures[future]
        self._executor.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
        self._executor = self._new_executor()
        self.restarts += 1
        for key, policy, attempts in held:
            if attempts >= RETRIES:
                failed.append((key, EvalFailure("worker process died twice while evaluating this policy")))
            else:
                self._futures[self._executor.submit(_evaluate_in_worker, policy)] = (key, policy, attempts + 1)
        return failed

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._queue.clear()
        self._failed.clear()


# ---- Ray -------------------------------------------------------------------------------------------------------------
class RayPool:
    """Ray actors each holding one Evaluator; a local Ray (num_cpus=workers) is started and stopped by the pool
    unless `address` names a running cluster. With `latency_resource`, latency is timed by one actor placed on a
    node carrying that custom resource (e.g. "device:pi4"), and the Measurement carries that node's hardware.

    Each actor holds at most one evaluation; the rest wait in the pool's own queue and go to whichever actor falls
    idle first (as a process pool's shared queue does). Sent ahead to a busy actor, a policy would wait for that actor
    even while another sat idle."""

    def __init__(self, model: nn.Module, data: DataBundle, settings: EvalSettings = EvalSettings(), *,
                 config: PoolConfig = PoolConfig(), space: SearchSpace | None = None) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        from squeezer.evaluators import ray_actors

        self.ray = ray
        address = resolve_address(config.ray_address)
        runtime_env = load_runtime_env(config.runtime_env)
        # no number given: one per core (GPU) of this machine, or of the cluster once joined
        self.workers = config.workers or (0 if address else default_workers(settings.device))
        data = data.without_test()
        self._owns = False
        if not ray.is_initialized():
            if address:
                check_reachable(address)
                try:
                    ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
                except (ConnectionError, RuntimeError) as exc:
                    raise ValueError(f"cannot connect to Ray at {address!r} ({type(exc).__name__}): start it with "
                                     "`ray start --head` or drop the Ray address to run locally") from None
            else:
                # address="local": always a fresh private instance, never a cluster some other run left behind
                ray.init(address="local", num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, runtime_env=runtime_env)
                self._owns = True
        offered = ray.cluster_resources()
        if not self.workers:
            self.workers = cluster_workers(settings.device, offered)
        # Model, data and space go to the object store once, not once per actor (Ray does not deduplicate
        # arguments), and the actor class is declared once: each ray.remote() of it would pickle and upload the
        # class again.
        model_ref, data_ref, space_ref = ray.put(model), ray.put(data), ray.put(space)
        self.latency_actor = None
        if config.latency_resource and settings.latency.mode != "none":
            cls = ray.remote(ray_actors.LatencyService).options(num_cpus=0, resources={config.latency_resource: 1})
            self.latency_actor = cls.remote(model_ref, data_ref, settings.latency)
        threads = threads_per_worker(self.workers, config.eval_threads)
        # Task events feed a cluster's dashboard and state API; the private instance has neither, and without them
        # each evaluation costs Ray a little less (benchmarks/search_orchestration.py).
        resources = actor_resources(settings.device, self.workers, offered.get("GPU", 0))
        # SPREAD: the evaluations go to every node that offers a core rather than filling the driver's node
        # first, and an actor replacing one lost with its node goes to a node still alive.
        actor = ray.remote(ray_actors.EvalActor).options(**resources, enable_task_events=bool(address),
                                                         scheduling_strategy="SPREAD")
        self._make = lambda: actor.remote(model_ref, data_ref, settings, space=space_ref, cache_dir=config.cache_dir,
                                          threads=threads, latency_service=self.latency_actor)
        self.actors = [self._make() for _ in range(self.workers)]
        self._inflight: dict[Any, tuple[int, Policy, int, int, Any]] = {}  # ref -> key, policy, attempts, index, actor
        self._queue: deque[tuple[int, Policy, int]] = deque()  # (key, policy, attempts) waiting for an idle actor
        self.restarts = 0
        self.description = describe_cluster(ray, address=address, workers=self.workers, device=settings.device)

    def _dispatch(self) -> None:
        """Send queued policies to idle actors, first in first out."""
        busy = {v[3] for v in self._inflight.values()}
        for index, actor in enumerate(self.actors):
            if not self._queue:
                return
            if index not in busy:
                key, policy, attempts = self._queue.popleft()
                self._inflight[actor.evaluate.remote(policy)] = (key, policy, attempts, index, actor)

    def submit(self, key: int, policy: Policy) -> None:
        self._queue.append((key, policy, 0))
        self._dispatch()

    def pending(self) -> int:
        return len(self._inflight) + len(self._queue)

    def actor_pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        """Finished (key, outcome) pairs: at least one unless nothing is pending or `timeout` passes."""
        from ray.exceptions import RayActorError

        results: list[tuple[int, Outcome]] = []
        while self._inflight and not results:
            ready, _ = self.ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
            if not ready:
                break
            ready, _ = self.ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
            for ref in ready:
                key, policy, attempts, index, actor = self._inflight.pop(ref)
                try:
                    results.append((key, self.ray.get(ref)))
                except RayActorError:
                    self._replace(index, actor)
                    if attempts >= RETRIES:
                        results.append((key, EvalFailure("Ray worker died twice while evaluating this policy")))
                    else:
                        self._queue.appendleft((key, policy, attempts + 1))
                except Exception as exc:
                    results.append((key, EvalFailure(f"Ray task failed: {type(exc).__name__}: {exc}"[:300])))
            self._dispatch()  # before the caller records these results and asks for more
        return results

    def _replace(self, index: int, dead: Any) -> None:
        """Start a fresh actor in place of a dead one, once however many of its calls come back failed."""
        if self.actors[index] is not dead:
            return
        try:
            self.ray.kill(dead)
        except Exception:
            pass
        self.actors[index] = self._make()
        self.restarts += 1

    def close(self) -> None:
        for actor in self.actors + ([self.latency_actor] if self.latency_actor is not None else []):
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        self._inflight.clear()
        self._queue.clear()
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


def cluster_workers(device: str, resources: dict[str, float]) -> int:
    """A cluster's default pool: one worker per CPU its nodes offer (per GPU with device 'cuda'). A node started with
    `--num-cpus 0`, such as a latency device, offers none, so no evaluation is placed on it."""
    return max(1, int(resources.get("GPU" if device == "cuda" else "CPU", 1)))


def actor_resources(device: str, workers: int, cluster_gpus: float) -> dict[str, float]:
    """What each evaluation actor asks Ray for: a core, and with device 'cuda' a GPU (a share of one when there are
    more workers than GPUs), so Ray places it on a GPU node and gives it a GPU of its own (CUDA_VISIBLE_DEVICES)."""
    if device != "cuda":
        return {"num_cpus": 1}
    if cluster_gpus <= 0:
        raise ValueError("--device cuda was given but the Ray cluster has no GPU: start its GPU nodes, or use "
                         "--device cpu")
    per_gpu = math.ceil(max(1, workers) / cluster_gpus)  # a share that divides one GPU, so Ray can pack the actors
    return {"num_cpus": 1, "num_gpus": 1.0 / per_gpu}


def make_pool(model: nn.Module, data: DataBundle, settings: EvalSettings = EvalSettings(), *,
              config: PoolConfig = PoolConfig(workers=1), space: SearchSpace | None = None) -> EvalPool:
    """A pool of `config.workers` evaluators in the backend `config` names (see PoolConfig); `space`, the model's
    traced SearchSpace, saves each worker tracing it again. The pool's `workers` says how many it holds."""
    config = replace(config, ray_address=resolve_address(config.ray_address))  # RAY_ADDRESS and auto, as Ray reads them
    workers = config.workers
    if workers is None and not config.ray_address:
        workers = default_workers(settings.device)
    remote = bool(config.ray_address or config.latency_resource or config.runtime_env)
    backend = config.backend
    if backend == "auto":
        try:
            import ray  # noqa: F401
            has_ray = True
        except ImportError:
            has_ray = False
        backend = "ray" if (has_ray and ((workers or 0) > 1 or remote)) else "local"
    if backend == "ray":
        try:
            return RayPool(model, data, settings, config=replace(config, workers=workers), space=space)
        except Exception as exc:  # noqa: BLE001
            if config.backend != "auto" or remote:
                raise
            # Ray was only the default: a machine where it cannot start still evaluates, in local processes.
            log.warning("Ray did not start (%s: %s); evaluating in %d local processes instead", type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "", workers)
    if remote:
        raise ValueError("a Ray address, latency resource or runtime env needs the Ray backend: pip install ray, or "
                         "drop them")
    return LocalPool(model, data, settings, config=replace(config, workers=workers), space=space)
