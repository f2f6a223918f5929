"""Drawing a run: the front (HTML and PNG) and a one-page run report.

Data first: `points`, `policy_rows` and `history_rows` return plain rows that tests check; the renderers below
them only draw those rows.
"""
from __future__ import annotations

import html
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from squeezer.policies.policy import Policy
from squeezer.search.pareto import StudyResult
from squeezer.spaces.knobs import KNOBS

log = logging.getLogger(__name__)

__all__ = ["points", "policy_rows", "history_rows", "write_front_html", "write_front_png",
           "write_report", "write_front_files"]


# ---- data ------------------------------------------------------------------------------------------------------
def points(result: StudyResult, *, metric_x: str = "macs") -> list[dict[str, Any]]:
    """Every completed trial as a point (x = metric_x fraction of base, accuracy), flagged feasible / on front."""
    front = {r.number for r in result.front(metric_x)}
    rows = []
    for r in result.with_cost(metric_x):
        rows.append({"number": r.number, "x": r.x, "accuracy": r.accuracy, "feasible": bool(r.feasible),
                     "front": r.number in front, "searcher": r.searcher or "", "fidelity": r.fidelity or "cheap",
                     "summary": r.policy.summary() if r.policy is not None else ""})
    return rows


def policy_rows(policy: Policy, units: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per unit with the choice each knob got (neutral values for units the policy leaves alone)."""
    names = units or sorted(policy.layers)
    rows = []
    for name in names:
        choice = policy.layers.get(name)
        rows.append({"unit": name, **{k: getattr(choice, k) if choice else None for k in KNOBS}})
    return rows


def history_rows(result: StudyResult) -> list[dict[str, Any]]:
    """Accuracy by trial number, with the best feasible accuracy so far."""
    best, rows = float("-inf"), []
    for r in sorted(result.completed(), key=lambda r: r.number):
        if r.feasible:
            best = max(best, r.accuracy)
        rows.append({"number": r.number, "accuracy": r.accuracy, "feasible": bool(r.feasible),
                     "best_feasible": best if best > float("-inf") else None})
    return rows


# ---- renderers -------------------------------------------------------------------------------------------------
def _front_figure(result: StudyResult, metric_x: str):
    import plotly.graph_objects as go

    pts = points(result, metric_x=metric_x)
    fig = go.Figure()
    for label, keep, style in (("infeasible", lambda p: not p["feasible"], dict(color="lightgray")),
                               ("feasible", lambda p: p["feasible"] and not p["front"], dict(color="steelblue")),
                               ("front", lambda p: p["front"], dict(color="crimson", size=10))):
        sel = sorted([p for p in pts if keep(p)], key=lambda p: p["x"])
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in sel], y=[p["accuracy"] for p in sel], name=label,
            mode="lines+markers" if label == "front" else "markers", marker=style,
            text=[f"trial {p['number']} ({p['searcher']}, {p['fidelity']})<br>{p['summary']}" for p in sel],
            hovertemplate="%{text}<br>" + metric_x + " %{x:.3f}<br>accuracy %{y:.4f}<extra></extra>"))
    fig.update_layout(xaxis_title=f"{metric_x} (fraction of base)", yaxis_title="accuracy",
                      title=f"budget {result.budget or 'none'}")
    return fig


PLOTLY_JS = "plotly.min.js"


def _plotly_js(folder: Path) -> str:
    """plotly.js written once into the run folder, which every page of the run references rather than inlining it."""
    path = folder / PLOTLY_JS
    if not path.is_file():
        from plotly.offline import get_plotlyjs

        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(get_plotlyjs())
        tmp.replace(path)
    return PLOTLY_JS


def write_front_html(result: StudyResult, out: str | Path, *, metric_x: str = "macs") -> Path:
    path = Path(out) / "front.html"
    _front_figure(result, metric_x).write_html(str(path), include_plotlyjs=_plotly_js(path.parent))
    return path


def write_front_png(result: StudyResult, out: str | Path, *, metric_x: str = "macs") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(result, metric_x=metric_x)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, keep, color in (("infeasible", lambda p: not p["feasible"], "lightgray"),
                               ("feasible", lambda p: p["feasible"], "steelblue")):
        sel = [p for p in pts if keep(p)]
        ax.scatter([p["x"] for p in sel], [p["accuracy"] for p in sel], s=12, c=color, label=label)
    front = sorted([p for p in pts if p["front"]], key=lambda p: p["x"])
    ax.plot([p["x"] for p in front], [p["accuracy"] for p in front], "o-", c="crimson", label="front")
    ax.set_xlabel(f"{metric_x} (fraction of base)")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    path = Path(out) / "front.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: StudyResult, out: str | Path, *, metric_x: str = "macs", trial: int | None = None) -> Path:
    """report.html: settings, hardware, the front, the chosen trial's per-unit choices, accuracy by trial."""
    if importlib.util.find_spec("plotly") is None:
        raise ValueError("the report is drawn with plotly, which is not installed: pip install 'squeezer[plots]'")
    import plotly.graph_objects as go

    out = Path(out)
    front = result.front(metric_x)
    chosen = next((r for r in result.rows if r.number == trial), None) if trial is not None else (
        max(front, key=lambda r: r.accuracy) if front else None)
    parts = [f"<h1>Squeezer search</h1><h2>Settings</h2><pre>{html.escape(json.dumps(_settings(result), indent=2))}"
             "</pre>", _front_figure(result, metric_x).to_html(full_html=False, include_plotlyjs=_plotly_js(out))]
    if chosen is not None and chosen.policy is not None:
        rows = policy_rows(chosen.policy)
        fig = go.Figure([go.Bar(name=k, x=[r["unit"] for r in rows], y=[_level(k, r[k]) for r in rows])
                         for k in KNOBS])
        fig.update_layout(title=f"trial {chosen.number}: compression per unit (0 = untouched)",
                          barmode="group", yaxis_title="compression")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    hist = history_rows(result)
    fig = go.Figure([go.Scatter(x=[h["number"] for h in hist], y=[h["accuracy"] for h in hist], mode="markers",
                                name="accuracy"),
                     go.Scatter(x=[h["number"] for h in hist], y=[h["best_feasible"] for h in hist],
                                mode="lines", name="best feasible")])
    fig.update_layout(title="search history", xaxis_title="trial", yaxis_title="accuracy")
    parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    path = out / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<html><head><meta charset='utf-8'><title>Squeezer search</title></head><body>"
                    + "\n".join(parts) + "</body></html>\n")
    return path


def _settings(result: StudyResult) -> dict[str, Any]:
    keep = ("budget", "objective", "sampler", "cost_metric", "seed", "settings", "fingerprint", "hardware")
    return {k: result.attrs.get(k) for k in keep if k in result.attrs} | {"trials": len(result.completed())}


def _level(knob: str, value: Any) -> float:
    """How compressed a unit's choice is (0 = untouched), as the knob registry orders its choices."""
    return 0.0 if value is None else KNOBS[knob].level(value)


def write_front_files(result: Any, out: Path, metric_x: str) -> list[Path]:
    """front.csv and front.json always; the plots where their optional packages are installed ('squeezer[plots]')."""
    files = list(result.write_front(out, metric_x=metric_x))
    if result.completed():
        for package, write in (("plotly", write_front_html), ("matplotlib", write_front_png)):
            if importlib.util.find_spec(package) is not None:
                files.append(write(result, out, metric_x=metric_x))
            else:
                log.info("%s is not installed: no %s plot (pip install 'squeezer[plots]')", package, write.__name__)
    return files
