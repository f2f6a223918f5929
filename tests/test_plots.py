"""A run's pages reference one copy of plotly.js in the run folder instead of each inlining it."""
from __future__ import annotations

from pathlib import Path

from fakes import fake_search

from squeezer.plots import PLOTLY_JS, write_front_html, write_report
from squeezer.search.pareto import StudyResult


def test_front_and_report_share_one_plotly_js_in_the_run_folder(tmp_path: Path) -> None:
    fake_search(str(tmp_path), trials=4, workers=1)
    result = StudyResult.load(tmp_path)
    pages = [write_front_html(result, tmp_path), write_report(result, tmp_path)]
    library = tmp_path / PLOTLY_JS
    assert library.is_file() and library.stat().st_size > 1_000_000
    for page in pages:
        text = page.read_text()
        assert f'src="{PLOTLY_JS}"' in text and len(text) < 200_000, page
    write_front_html(result, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.js")) == [PLOTLY_JS]
