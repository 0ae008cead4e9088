"""The typed records: validation, immutability, exact JSON round trips, and the labels reports print."""

import math

import pytest
from pydantic import ValidationError

from loraplace.records import (
    CurvePoint,
    Failure,
    GroupKey,
    Metrics,
    ProbeScores,
    ProbeSite,
    Site,
    SiteMap,
    Size,
    TrialOutcome,
    lora_params,
)


def test_a_done_outcome_needs_metrics_and_a_failed_one_a_failure():
    with pytest.raises(ValidationError, match="done trial has metrics"):
        TrialOutcome(status="done")
    with pytest.raises(ValidationError, match="failed trial has a failure"):
        TrialOutcome(status="failed", metrics=Metrics(eval_loss=1.0, perplexity=2.7))
    with pytest.raises(ValidationError, match="extra"):
        Metrics(eval_loss=1.0, perplexity=2.7, trainable_params=5)  # a size is not a metric


def test_outcomes_round_trip_exactly_through_json():
    outcome = TrialOutcome(
        status="done", metrics=Metrics(eval_loss=700.5, perplexity=math.inf, tokens_per_s=1.5, train_s=2.0,
                                       peak_mem_mb=3.0),
        trainable_params=12, total_params=100, curve=(CurvePoint(step=1, loss=float("nan"), tokens=3, lr=0.1),),
        sites=SiteMap(num_layers=2, roles=("attn.q", "head"), sites=(Site(layer=None, role="head", rank=4),)))
    back = TrialOutcome.model_validate_json(outcome.model_dump_json())
    assert back.metrics == outcome.metrics and back.metrics.perplexity == math.inf
    assert math.isnan(back.curve[0].loss) and back.sites == outcome.sites
    with pytest.raises(ValidationError):
        back.metrics.eval_loss = 0.0  # frozen


def test_summary_is_flat_and_measured_only():
    failed = TrialOutcome.failed(Failure(kind="non_finite", message="nan at step 3", step=3), trainable_params=7)
    s = failed.summary()
    assert (s["status"], s["error"], s["failed_step"], s["trainable_params"]) == ("failed", "nan at step 3", 3, 7)
    assert "eval_loss" not in s
    done = TrialOutcome(status="done", metrics=Metrics(eval_loss=1.0, perplexity=math.e), trainable_params=10,
                        total_params=1000)
    assert done.summary(scalars_only=True)["trainable_percent"] == 1.0
    assert "accuracy" not in done.summary()  # not measured: absent, not None
    assert Failure(kind="invalid", message="x").user_error and not Failure(kind="error", message="x").user_error


def test_group_keys_are_values_with_labels():
    a = GroupKey(placement="attn", size=Size(kind="budget", value=1_000_000), axes=(("lr", 0.001),))
    assert a.label == "attn B=1,000,000 lr=0.001" and a.size_label == "B=1,000,000 lr=0.001"
    assert a == GroupKey.model_validate_json(a.model_dump_json())  # a stored key compares equal
    assert a.cell == GroupKey(placement="all", size=a.size, axes=a.axes).cell
    assert {a: 1}[GroupKey(placement="attn", size=a.size, axes=(("lr", 0.001),))] == 1  # hashable
    assert GroupKey(placement="x", size=Size(kind="rank", value=8)).label == "x r=8"


def test_site_map_and_probe_scores():
    sites = SiteMap(num_layers=4, roles=("attn.q",), sites=tuple(Site(layer=i, role="attn.q", rank=2 * (i % 2) + 2)
                                                                 for i in (1, 2)))
    assert sites.layers == [1, 2] and sites.layer_selective and sites.ranks == [2, 4]
    assert lora_params(8, 64, 32) == 8 * 96
    site = ProbeSite(layer=0, role="attn.q", path="p", in_features=64, out_features=32, score=3.0, grad_norm=5.0,
                     rank=2, spectrum=(9.0, 4.0, 1.0))
    assert site.params == 192 and site.efficiency == 3.0 / 192 and site.captured == pytest.approx(0.36)
    assert site.value(1) == 3.0 and site.value(3) == pytest.approx(math.sqrt(14))
    probe = ProbeScores(model="m", rank=2, batches=1, label_tokens=1, seconds=0.0, passes=1, num_layers=2,
                        roles=("attn.q", "attn.k"), sites=(site,))
    matrix = probe.matrix("score")
    assert matrix[0][0] == 3.0 and all(math.isnan(v) for v in (matrix[0][1], matrix[1][0], matrix[1][1]))
    assert probe.without_spectra().sites[0].spectrum == () and probe.sites[0].spectrum == (9.0, 4.0, 1.0)
    assert probe.to_dict()["sites"][0]["params"] == 192


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import stat

    from loraplace import atomic
    from loraplace.atomic import write_text_atomic

    path = write_text_atomic(tmp_path / "report.html", "<html></html>")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~atomic._UMASK and path.read_text() == "<html></html>"
