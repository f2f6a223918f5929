"""Terminal rendering of the jobs' results (rich tables). Data in, text out: no decisions are made here."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.table import Table

from squeezer.progress import terminal_console

if TYPE_CHECKING:
    from squeezer.search.records import TrialRecord

console = terminal_console()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "-"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], title: str, columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(_fmt(row.get(c)) for c in columns))
    console.print(t)


def train(result: Any) -> None:
    console.print(f"trained in {result.seconds:.1f}s: val accuracy {result.val_accuracy:.4f}, "
                  f"test accuracy {result.test_accuracy:.4f} -> {result.path}")


def space(space: Any) -> None:
    from squeezer.spaces.knobs import KNOBS  # here: the registry loads torch, which the other renderers never need

    table(space.table(), f"search space ({len(space.units)} units, {len(space.groups)} channel groups)",
          ["unit", "kind", "shape", "macs", "group", *KNOBS, "note"])
    base = space.baseline()
    console.print(f"{len(space.distributions())} knobs, {space.size():.3g} policies; base {base.macs:,} MACs/sample, "
                  f"{base.params:,} layer params; fingerprint {space.fingerprint}")


FRONT_COLUMNS = ["trial", "accuracy", "x", "macs", "params", "size_mb", "latency_ms", "feasible", "fidelity"]


def _front_rows(rows: list[TrialRecord], metric_x: str) -> list[dict[str, Any]]:
    return [{"trial": r.number, "accuracy": r.accuracy, "x": f"{100 * r.x:.1f}%" if r.x is not None else None,
             "macs": f"{r.macs:,}" if r.macs is not None else None, "params": r.params, "size_mb": r.size_mb,
             "latency_ms": r.latency_ms, "feasible": r.feasible, "fidelity": r.fidelity or "cheap"} for r in rows]


# What the base a search compares with went through: every candidate's recovery, applied to the unchanged model too.
_BASE_RECOVERY = {"bn": "BatchNorm re-estimated as for every candidate",
                  "finetune": "fine-tuned as every candidate is", "kd": "fine-tuned as every candidate is"}


def _base_line(base: Any, checkpoint_accuracy: float | None = None) -> str:
    if base is None:
        return "base: not recorded"
    latency = f", {base.latency_ms:.3f} ms" if base.latency_ms is not None else ""
    how = _BASE_RECOVERY.get(base.recovery)
    saved = f"; the model file as saved: accuracy {checkpoint_accuracy:.4f}" if checkpoint_accuracy is not None \
        and how else ""
    return (f"base{f' ({how})' if how else ''}: accuracy {base.accuracy:.4f}, {base.macs:,} MACs, "
            f"{base.params:,} params, {base.size_mb:.3f} MB{latency}{saved}")


def front_table(rows: list[TrialRecord], metric_x: str, title: str) -> None:
    columns = [c if c != "x" else f"{metric_x} of base" for c in FRONT_COLUMNS]
    shown = [{(k if k != "x" else f"{metric_x} of base"): v for k, v in r.items()} for r in _front_rows(rows, metric_x)]
    table(shown, title, columns)


def search(summary: Any) -> None:
    console.print(_base_line(summary.base, summary.checkpoint_accuracy), markup=False, highlight=False)
    front_table(summary.front, summary.metric_x,
                f"Pareto front: accuracy vs {summary.metric_x} (budget {summary.budget})")
    console.print(f"{summary.completed} trials completed, {summary.failed} failed, {summary.seconds:.0f}s; "
                  f"files: {', '.join(str(f) for f in summary.files)}")
    for reason, count in summary.failures:
        console.print(f"  {count} failed: {reason}", markup=False, highlight=False)
    if getattr(summary, "interrupted", 0):
        console.print(f"  {summary.interrupted} interrupted when a search was stopped, and queued again to run on "
                      "resume (not counted as failed)", markup=False, highlight=False)
    _latency_check(summary.latency_check)
    if getattr(summary, "study", None):
        console.print(summary.study, markup=False, highlight=False)
    if summary.front:
        best = max(summary.front, key=lambda r: r.accuracy)
        console.print(f"next: squeezer apply {summary.out} --trial {best.number} --out compressed.pt")
    elif summary.closest:
        _closest(summary.closest)
    if summary.dashboard and not getattr(summary, "study", None):  # a shared study's line already names it
        console.print(f"browse the study: {summary.dashboard}  (pip install optuna-dashboard)", markup=False,
                      highlight=False)


def _latency_check(check: dict[str, float] | None) -> None:
    if check:
        console.print(f"latency table: predicted the {check['timed']} candidates it was checked on within "
                      f"{100 * check['median_error']:.1f}% (median; measured / predicted {check['median_ratio']:.2f})",
                      markup=False, highlight=False)


def _closest(c: dict[str, Any]) -> None:
    misses = ", ".join(f"{limit} by {100 * excess:.1f}%" for limit, excess in c["over"].items())
    console.print(f"no trial met the budget; the closest, trial {c['number']} (accuracy {c['accuracy']:.4f}), "
                  f"missed {misses}: {c['hint']}", markup=False, highlight=False)


def front(summary: Any) -> None:
    console.print(_base_line(summary.base), markup=False, highlight=False)
    front_table(summary.front, summary.metric_x,
                f"Pareto front of {summary.completed} trials: accuracy vs {summary.metric_x} (budget {summary.budget})")
    if summary.closest:
        _closest(summary.closest)
    _latency_check(summary.latency_check)
    if summary.under:
        b = summary.best_under
        console.print(f"most accurate under {summary.under}: " + (
            "none" if b is None else f"trial {b.number} (accuracy {b.accuracy:.4f})"))
    console.print(f"files: {', '.join(str(f) for f in summary.files)}")


def apply(summary: Any) -> None:
    m, rec, base = summary.measured, summary.recorded, summary.base
    rows = []
    for key, label in (("accuracy", "val accuracy"), ("macs", "MACs"), ("params", "params"),
                       ("size_mb", "size MB"), ("latency_ms", "latency ms"),
                       ("latency_rel", "latency / reference")):  # timed interleaved: the drift-proof comparison
        rows.append({"metric": label, "base": None if base is None else getattr(base, key),
                     "searched": None if rec is None else getattr(rec, key), "now": getattr(m, key)})
    table(rows, f"applied {summary.policy}" + (" + fine-tune" if summary.finetuned else ""),
          ["metric", "base", "searched", "now"])
    console.print(f"test accuracy {summary.test_accuracy:.4f}; saved {summary.out}"
                  + (f" and {summary.onnx}" if summary.onnx else ""))
    if summary.inputs:
        i = summary.inputs
        console.print(f"inputs: images in {i['input_range']}, then (x - mean) / std per channel with mean "
                      f"{i['input_mean']} and std {i['input_std']} (saved with the model)", markup=False,
                      highlight=False)


def report(path: Any) -> None:
    console.print(f"wrote {path}")


def demo(summary: Any) -> None:
    if summary.trained is not None:
        train(summary.trained)
    search(summary.search)
    if summary.applied is not None:
        apply(summary.applied)
    if getattr(summary, "compared", None) is not None:
        side_by_side(summary.compared)


def side_by_side(compared: Any) -> None:
    """The two files a user holds, measured alike: what compression bought on this machine, said plainly."""
    b, c = compared.base, compared.compressed
    names = ["metric", b.onnx.name, c.onnx.name]
    rows = [dict(zip(names, row)) for row in (
        ["test accuracy", f"{b.test_accuracy:.4f}", f"{c.test_accuracy:.4f}"],
        ["MACs", f"{b.macs:,}", f"{c.macs:,}"],
        ["ONNX bytes", f"{b.onnx_bytes:,}", f"{c.onnx_bytes:,}"],
        ["onnxruntime latency ms", f"{b.latency_ms:.4f}", f"{c.latency_ms:.4f}"])]
    table(rows, "base beside compressed, timed interleaved on this machine", names)
    speed = (f"{compared.speedup:.2f}x faster" if compared.faster
             else f"not faster here ({compared.speedup:.2f}x): it buys size only")
    console.print(f"compressed: {speed}, {b.onnx_bytes / max(1, c.onnx_bytes):.1f}x smaller on disk, "
                  f"{c.test_accuracy - b.test_accuracy:+.4f} test accuracy; time both yourself: {b.onnx} and "
                  f"{c.onnx}", markup=False, highlight=False)


# ---- machine-readable output (--json): one JSON document on stdout, nothing else -----------------------------------
def print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, default=str))  # paths as strings


def _metrics(m: Any) -> dict[str, Any] | None:
    return None if m is None else m.metrics()


def front_json(summary: Any) -> dict[str, Any]:
    from squeezer.search.pareto import front_row

    best = summary.best_under
    return {"run": str(summary.out), "budget": summary.budget, "metric_x": summary.metric_x,
            "completed": summary.completed, "base": _metrics(summary.base),
            "front": [front_row(r) for r in summary.front], "under": summary.under,
            "best_under": None if best is None else front_row(best), "closest": summary.closest,
            "latency_check": summary.latency_check, "files": [str(f) for f in summary.files]}


def apply_json(summary: Any) -> dict[str, Any]:
    rec = summary.recorded
    return {"out": str(summary.out), "onnx": None if summary.onnx is None else str(summary.onnx),
            "policy": summary.policy, "trial": None if rec is None else rec.number,
            "measured": _metrics(summary.measured), "searched": _metrics(None if rec is None else rec.measurement()),
            "base": _metrics(summary.base), "test_accuracy": summary.test_accuracy, "finetuned": summary.finetuned,
            "inputs": summary.inputs}
