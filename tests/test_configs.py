"""The run's settings as typed configs: bad values fail where they are written, naming the field and what it may
be; run.json is written and read by one function pair, and run folders written before the configs still read and
resume; one check refuses a resume whose trials would not compare."""
from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

from squeezer.evaluators.evaluate import EvalSettings
from squeezer.evaluators.pool import PoolConfig
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.run_folder import check_run, read_run, write_run
from squeezer.search.amc_agent import AgentConfig
from squeezer.search.config import RunConfig, SearchConfig, SearchError, check_resume, run_from_json, run_to_json

# run.json's "eval" record as run folders written before the configs hold it: every setting one level deep
LEGACY_EVAL = {"recovery": "kd", "bn_batches": 20, "finetune_steps": 30, "finetune_lr": 0.01, "kd_weight": 0.5,
               "kd_temperature": 4.0, "batch_size": 64, "latency": "hybrid", "latency_batch": 1,
               "latency_threads": 2, "latency_warmup": 30, "latency_runs": 200, "latency_reps": 3,
               "latency_table_reps": 3, "measure_every": 5, "distill_steps": 0, "device": "cpu", "seed": 3}
LEGACY_RUN = {"model": "/runs/base.pt", "data": "digits", "fingerprint": "abc123", "budget": "macs<=50%",
              "objective": "multi", "knobs": ["prune", "w_bits"], "sampler": "tpe", "seed": 3, "eval": LEGACY_EVAL}


@pytest.mark.parametrize("make, needle", [
    (lambda: RecoveryConfig(mode="magic"), "unknown recovery mode 'magic': choose from none, bn, finetune, kd"),
    (lambda: RecoveryConfig(bn_batches=0), "bn_batches must be at least 1, got 0"),
    (lambda: RecoveryConfig(finetune_lr=0), "finetune_lr must be positive"),
    (lambda: RecoveryConfig(kd_weight=1.5), "kd_weight mixes distillation into the loss: give 0 to 1"),
    (lambda: RecoveryConfig(distill_steps=-1), "distill_steps must be at least 0"),
    (lambda: LatencyConfig(mode="fast"), "unknown latency mode 'fast': choose from measure, predict, hybrid, none"),
    (lambda: LatencyConfig(threads=0), "threads must be at least 1, got 0"),
    (lambda: LatencyConfig(measure_every=0), "measure_every must be at least 1"),
    (lambda: LatencyConfig(warmup=-1), "warmup must be at least 0"),
    (lambda: EvalSettings(device="tpu"), "unknown device 'tpu': choose from cpu, cuda"),
    (lambda: EvalSettings(latency="none"), "latency must be a LatencyConfig, got 'none'"),
    (lambda: PoolConfig(backend="dask"), "unknown pool backend 'dask': choose from auto, local, ray"),
    (lambda: PoolConfig(workers=0), "workers must be at least 1"),
    (lambda: PoolConfig(eval_threads=0), "eval_threads must be at least 1"),
    (lambda: SearchConfig(sampler="anneal"), "unknown sampler 'anneal': choose from tpe, nsga2"),
    (lambda: SearchConfig(objective="both"), "unknown objective 'both': choose from multi, single"),
    (lambda: SearchConfig(trials=0), "trials must be at least 1, got 0"),
    (lambda: SearchConfig(knobs=("prune", "sparsity")), "unknown knob 'sparsity': choose from prune"),
    (lambda: SearchConfig(knobs=()), "knobs is empty"),
    (lambda: SearchConfig(cost_metric="joules"), "unknown cost_metric 'joules': choose from macs"),
    (lambda: SearchConfig(promote=-1), "promote must be 0 or more"),
    (lambda: SearchConfig(budget="speed<=2ms"), "unknown metric 'speed'"),
    (lambda: AgentConfig(tau=0), "tau must be in (0, 1]"),
    (lambda: AgentConfig(batch_size=0), "batch_size must be at least 1"),
])
def test_a_bad_setting_fails_where_it_is_written_naming_the_field(make, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        make()
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_configs_are_frozen_and_keyword_only() -> None:
    with pytest.raises(FrozenInstanceError):
        SearchConfig().trials = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        LatencyConfig("predict")  # type: ignore[misc]
    assert SearchConfig(budget="macs <= 50 %").budget == SearchConfig(budget="macs<=50%").budget == "macs<=50%"


def test_evaluation_threads_are_the_users_then_omp_num_threads_then_a_share_of_the_cores(monkeypatch) -> None:
    from squeezer.evaluators.pool import threads_per_worker

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_worker(2) == 4 and threads_per_worker(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_worker(1) == 1
    assert threads_per_worker(1, 3) == 3


def test_run_json_round_trips(tmp_path: Path) -> None:
    run = RunConfig(model="/runs/base.pt", data="digits", fingerprint="abc123",
                    search=SearchConfig(budget="latency<=60%,size<=1MB", trials=40, sampler="ddpg", knobs=("prune",),
                                        repair=True, promote=2, seed=7, storage="journal"),
                    eval=EvalSettings(recovery=RecoveryConfig(mode="kd", finetune_steps=30, kd_weight=0.7),
                                      latency=LatencyConfig(mode="hybrid", threads=2, table_reps=6), seed=7))
    data = json.loads(json.dumps(run_to_json(run)))
    assert data["version"] == 2 and data["eval"]["latency"]["table_reps"] == 6 and "storage" not in data
    # a URL may hold a password; the space settings left unset are recorded as searched
    assert run_from_json(data) == replace(run, search=replace(run.search.resumed(None), storage=None))
    write_run(tmp_path, run)
    assert read_run(tmp_path) == run_from_json(data)
    check_run(tmp_path, run)  # the same settings resume


def test_a_run_json_written_before_the_configs_reads_back() -> None:
    run = run_from_json(LEGACY_RUN)
    assert (run.model, run.fingerprint, run.search.budget, run.search.knobs, run.search.seed) == (
        "/runs/base.pt", "abc123", "macs<=50%", ("prune", "w_bits"), 3)
    assert run.eval == EvalSettings(recovery=RecoveryConfig(mode="kd", finetune_steps=30),
                                    latency=LatencyConfig(mode="hybrid", threads=2), seed=3)
    # the one-level names are exactly those records', so outcomes they cached keep their keys
    assert run.eval.flat() == LEGACY_EVAL


def test_the_space_settings_are_recorded_and_an_older_run_resumes_with_its_own(tmp_path: Path) -> None:
    old = run_from_json(LEGACY_RUN)  # written before the rounding and the prune grid were recorded
    assert (old.search.channel_round, old.search.prune_grid) == (8, (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75))
    unset = SearchConfig(budget="macs<=50%", knobs=("prune", "w_bits"), seed=3)
    resumed = unset.resumed(old.search)  # a resume that says nothing searches the recorded space
    assert resumed.space.round_to == 8 and max(resumed.space.grid("prune")) == 0.75
    fresh = unset.resumed(None)  # a new run: the defaults, which prune deeper
    assert fresh.space.grid("prune")[-1] == 0.875
    finer = SearchConfig(channel_round=4, prune_grid=(0.9, 0.5, 0.0)).resumed(old.search)  # what is set stays set
    assert (finer.channel_round, finer.prune_grid) == (4, (0.0, 0.5, 0.9))
    with pytest.raises(SearchError, match="channel_round 8 there, 4 now"):
        check_resume(LEGACY_RUN, run_to_json(replace(old, search=replace(old.search, channel_round=4))),
                     out=tmp_path)
    check_resume(LEGACY_RUN, run_to_json(replace(old, search=resumed)), out=tmp_path)
    record = run_to_json(replace(old, search=finer))
    assert (record["channel_round"], record["prune_grid"]) == (4, [0.0, 0.5, 0.9])
    for bad in ({"channel_round": 0}, {"prune_grid": (0.5, 1.0)}, {"prune_grid": ()}):
        with pytest.raises(ValueError, match="channel_round|prune_grid"):
            SearchConfig(**bad)


def test_one_check_refuses_a_resume_whose_trials_would_not_compare(tmp_path: Path) -> None:
    same = run_from_json(LEGACY_RUN)
    check_resume(LEGACY_RUN, run_to_json(same), out=tmp_path)  # an old folder resumes with its own settings
    timed_more = replace(same.eval, latency=replace(same.eval.latency, runs=500, reps=5))
    check_resume(LEGACY_RUN, run_to_json(replace(same, eval=timed_more)), out=tmp_path)  # timing care: no matter
    hotter = replace(same.eval, recovery=replace(same.eval.recovery, kd_temperature=3.0))
    with pytest.raises(SearchError, match="scored with other evaluation settings .kd_temperature 4.0 there, 3.0 now"):
        check_resume(LEGACY_RUN, run_to_json(replace(same, eval=hotter)), out=tmp_path)
    fewer_knobs = replace(same, search=replace(same.search, knobs=("prune",)))
    with pytest.raises(SearchError) as exc:
        check_resume(LEGACY_RUN, run_to_json(fewer_knobs), out=tmp_path)
    assert "holds a different study (knobs ['prune', 'w_bits'] there, ['prune'] now)" in str(exc.value)
    # a study's own attrs are checked by the same keys; what an older record lacks is not compared
    attrs = {"fingerprint": "abc123", "budget": "macs<=50%", "objective": "multi", "sampler": "tpe",
             "cost_metric": "macs"}
    check_resume(attrs, {**attrs, "knobs": ["prune"]}, out=tmp_path)
    with pytest.raises(SearchError, match="cost_metric 'macs' there, 'size' now"):
        check_resume(attrs, {**attrs, "cost_metric": "size"}, out=tmp_path)
