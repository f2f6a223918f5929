"""Where accuracy work runs: a device name checked before anything loads."""
from __future__ import annotations

__all__ = ["check_device"]


def check_device(device: str, cluster: bool = False) -> None:
    """`cluster`: evaluations run in a Ray cluster, whose GPUs the pool checks (this machine may have none)."""
    import torch

    if device == "cuda" and not cluster and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA GPU is visible: use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use cpu or cuda")
