"""Joining a Ray cluster the way Ray's own tools do, failing fast when it is not there, and shipping the user's code.

Why a module of its own: `ray.init()` honours RAY_ADDRESS and `auto` itself, but an unreachable address makes it
retry for minutes; resolving the address here first lets the pool check that it answers and say so in one line.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ENV_VAR", "check_reachable", "describe_cluster", "load_runtime_env", "resolve_address"]

ENV_VAR = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 3.0
RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "container",
                    "image_uri", "config", "nsight", "java_jars", "worker_process_setup_hook")


def resolve_address(flag: str | None) -> str | None:
    """The cluster address a search joins, None for a private local Ray, as `ray.init(address=flag)` picks it.

    RAY_ADDRESS, when set, stands in for a missing flag or `auto`; `auto` without it means the cluster the last
    `ray start` on this machine left its address for. "local" is always a private instance."""
    env = os.environ.get(ENV_VAR, "").strip()
    if flag is None or flag == "auto":
        if env:
            return env
        if flag is None:
            return None
        found = _last_started_cluster()
        if found is None:
            raise ValueError("--ray-address auto found no Ray cluster on this machine and RAY_ADDRESS is not set: "
                             "start one with `ray start --head`, or pass its address")
        return found
    return None if flag == "local" else flag


def _last_started_cluster() -> str | None:
    """The address `ray start` recorded for `auto` (Ray's own lookup, read without starting anything)."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) or None
    except Exception:  # noqa: BLE001  (a Ray without that helper: no recorded cluster, as for a fresh machine)
        return None


def check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when `address` (host:port or ray://host:port) does not
    accept a connection."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rstrip("/").rpartition(":")
    source = f" (from {ENV_VAR})" if os.environ.get(ENV_VAR, "").strip() == address else ""
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError):
        raise ValueError(f"no Ray cluster answers at {address!r}{source}: start one with `ray start --head`, fix the "
                         f"address, or unset {ENV_VAR} and drop --ray-address to run locally") from None


def load_runtime_env(text: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A Ray runtime_env from JSON text, a JSON file's path, or a mapping; relative working_dir and py_modules
    paths are made absolute here, where they were meant, before Ray packs and uploads them to every node."""
    if text is None:
        return None
    if isinstance(text, Mapping):
        env = dict(text)
    else:
        source = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).is_file() else text
        try:
            env = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--ray-runtime-env is neither a JSON object nor a JSON file ({exc.msg}): pass e.g. "
                             "'{\"working_dir\": \".\"}'") from None
    if not isinstance(env, dict):
        raise ValueError("--ray-runtime-env must be a JSON object, e.g. '{\"working_dir\": \".\"}'")
    unknown = sorted(set(env) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise ValueError(f"--ray-runtime-env has unknown field {unknown[0]!r}: use Ray's fields, e.g. working_dir, "
                         "py_modules, pip, env_vars")
    if isinstance(env.get("working_dir"), str) and "://" not in env["working_dir"]:
        env["working_dir"] = _existing(env["working_dir"])
    if isinstance(env.get("py_modules"), list):
        env["py_modules"] = [_existing(m) if isinstance(m, str) and "://" not in m else m for m in env["py_modules"]]
    return env


def _existing(path: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ValueError(f"--ray-runtime-env names {path!r}, which does not exist: pass a folder or module that does")
    return str(resolved)


def describe_cluster(ray: Any, *, address: str | None, workers: int, device: str) -> str:
    """One line for the driver to print: which cluster it joined and what its pool uses of it."""
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001  (a Ray client that cannot list nodes still evaluates)
        resources, nodes = {}, 0
    where = f"Ray cluster at {address}" if address else "a private local Ray"
    unit = "GPU" if device == "cuda" else "CPU"
    return (f"joined {where}: {nodes} node{'s' * (nodes != 1)}, {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs; evaluating with {workers} worker{'s' * (workers != 1)} "
            f"(one {unit} each)")
