"""A tiny mixture-of-experts study end to end: 3 placements × 2 seeds on a random Qwen3-MoE, and a report whose
placement map shows the experts."""

import pytest

from helpers import run_study_once, tiny_study_yaml
from loraplace.analysis import analyze_store
from loraplace.analysis.report import write_report
from loraplace.placement.roles import ROLES, short_role

PLACEMENTS = {"attn": "{preset: attn}", "experts-top": "{roles: [moe.experts], layers: 'top:50%'}",
              "all": "{preset: all}"}


@pytest.fixture(scope="module")
def moe_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-study")
    return run_study_once(root, tiny_study_yaml("moe", model="tiny:qwen3_moe", placements=PLACEMENTS, steps=4))


def test_moe_study_runs_and_reports_the_experts(moe_store, tmp_path):
    analysis = analyze_store(moe_store)
    assert analysis.counts.get("done") == 6
    by_placement = {g.placement: g for g in analysis.groups}
    experts_top = by_placement["experts-top"].sites
    assert {s.role for s in experts_top.sites} == {"moe.experts.gate_up", "moe.experts.down"}
    assert {s.layer for s in experts_top.sites} == {1}
    assert {"moe.experts.gate_up", "moe.experts.down"} <= {s.role for s in by_placement["all"].sites.sites}
    # 2 layers × (gate_up 64→64, down 32→64) × 4 experts at rank 2, plus nothing else
    assert by_placement["experts-top"].trainable_params == 4 * 2 * ((64 + 64) + (32 + 64))
    written = write_report(analysis, tmp_path / "report", formats=("md",))
    md = written["md"].read_text()
    assert "Eval loss by layer range and role" in md
    site_row = next(line for line in md.splitlines() if line.startswith("| experts-top r=2 | 1 of 0–1 |"))
    assert "moe.experts.gate_up, moe.experts.down" in site_row
    assert (tmp_path / "report" / "figures" / "sites.png").stat().st_size > 1000
    assert "exp.* columns are the routed experts" in md


def test_figure_role_labels_are_unique():
    assert len({short_role(r) for r in ROLES}) == len(ROLES)
    assert short_role("moe.experts.down") == "exp.down" and short_role("mlp.down") == "down"
