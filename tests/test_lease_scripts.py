"""The GPU lease's measuring scripts run end to end here (tiny shapes, CPU): a lease minute is not the place to
find that one of them no longer starts."""

from __future__ import annotations

import json
import sys

import pytest

from maskspec.decode.static import step_rows

from conftest import load_script


def test_step_cost_model_times_passes_static_steps_and_trees(tmp_path, monkeypatch):
    out = tmp_path / "costs"
    monkeypatch.setattr(sys, "argv", ["step_cost_model.py", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32",
                                      "--ks", "0,2", "--past", "60", "--repeats", "2", "--warmup", "1", "--static",
                                      "--trees", "4", "--out", str(out)])
    load_script("step_cost_model").main()
    result = json.loads((out / "step_costs.json").read_text())
    assert set(result["ms_per_pass"]) == {"0", "2"}
    assert set(result["static_ms_per_step"]) == {"0", "2", "2-tree4"}
    assert all(ms > 0 for ms in [*result["ms_per_pass"].values(), *result["static_ms_per_step"].values()])
    table = (out / "step_costs.md").read_text()
    assert f"| 2, tree 4 | {step_rows(2, 4)} |" in table


@pytest.mark.slow  # the embedded model and its shipped adapter
def test_profile_step_summarises_both_steps(tmp_path, monkeypatch):
    out = tmp_path / "profile"
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--device", "cpu", "--k", "2", "--steps", "3",
                                      "--threads", "1", "--out", str(out)])
    load_script("profile_step").main()
    result = json.loads((out / "profile.json").read_text())
    assert [(r["step"], r["k"], r["steps"]) for r in result["results"]] == [("usual", 2, 3), ("static", 2, 3)]
    for row in result["results"]:
        assert row["ms_per_step"] > 0 and row["top_host"] and all(ms >= 0 for _, _, ms in row["top_host"])
    assert "static" in (out / "profile.md").read_text()


def test_lease_parts_fit_beside_the_tracked_files():
    lease = load_script("lease")
    mib = 2**20
    assert lease.part_size(10 * mib) == 46 * mib  # room to spare: the usual size
    grown = lease.part_size(19 * mib)  # answers and results committed since: a smaller part
    assert grown < 46 * mib and 19 * mib + grown + lease.MARGIN <= 64 * mib
    assert lease.part_size(19 * mib, 40) == 40 * mib  # asked for, and it fits
    with pytest.raises(SystemExit, match="pass a smaller --part-mb"):
        lease.part_size(19 * mib, 46)
    with pytest.raises(SystemExit, match="less than 8 MiB"):
        lease.part_size(60 * mib)
