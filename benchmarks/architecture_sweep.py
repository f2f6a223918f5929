"""The architecture sweep's table: each model's units, whether apply kept its outputs, MACs predicted/counted,
whether ONNX matched torch, and its seconds (tests/architecture_checks.py, random weights, 3 random policies).

Run: python benchmarks/architecture_sweep.py [--models squeezenet1_1 googlenet ...] [--size 64]
Default models: every torchvision classification and segmentation model (long: pass --models for a subset).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the checks live with the tests
from architecture_checks import check_model, torchvision_builder  # noqa: E402

MARK_START, MARK_END = "<!-- architecture_sweep:start -->", "<!-- architecture_sweep:end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=sorted(
        torchvision.models.list_models(module=torchvision.models)
        + torchvision.models.list_models(module=torchvision.models.segmentation)))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [MARK_START, "## Architecture sweep (issue 24)", "",
             f"`python benchmarks/architecture_sweep.py --models {' '.join(args.models)} --size {args.size}`"
             " (1 torch thread, shared 2-core CPU)", "",
             "| model | units | apply ok | outputs kept | MACs predicted / counted (each policy) | ONNX ok | s |",
             "|---|---|---|---|---|---|---|"]
    for name in args.models:
        row = check_model(name, torchvision_builder(name, args.size), torch.randn(1, 3, args.size, args.size))
        macs = ", ".join(f"{p}/{c}" for p, c in row.macs) or "-"
        lines.append(f"| {name} | {row.units} | {row.apply_ok} | {row.outputs_kept} | {macs} | {row.onnx_ok} "
                     f"| {row.seconds:.1f} |")
        print(lines[-1], row.problems or "", flush=True)
    lines.append(MARK_END)
    text = "\n".join(lines) + "\n"
    old = args.results.read_text()
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        args.results.write_text(head + text.rstrip("\n") + rest.split(MARK_END, 1)[1])
    else:
        args.results.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
