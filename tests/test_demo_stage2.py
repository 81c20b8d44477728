"""`corral demo --stage2`: DPO from the demo's SFT run, then its win rate over it, on the real
embedded model (the steps after the SFT demo, from an SFT run trained here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_DATA = REPO / "configs" / "training" / "smoke_alpaca.json"


@pytest.mark.long
def test_stage2_trains_dpo_from_the_sft_run_and_judges_it_against_it(tmp_path, capsys):
    from corral.training.demo import train_demo_adapter

    from corral.cli.demo import DEMO_TEMPLATE, dpo_step, win_rate_step
    from corral.rundir import read_run_info

    sft = Path(train_demo_adapter(SMOKE_DATA, tmp_path / "run", epochs=1))
    dpo = dpo_step(tmp_path, sft, fresh=False)
    info = read_run_info(dpo)
    assert (info.method, info.template) == ("dpo", DEMO_TEMPLATE)
    config = (dpo / "corral_config.yaml").read_text()
    assert f"init_adapter: {sft}" in config
    summary = json.loads((dpo / "train_summary.json").read_text())
    assert summary["method"] == "dpo" and "rewards/accuracies" in summary["eval_metrics"]

    rates = win_rate_step(sft, dpo, max_new_tokens=16)
    assert set(rates) == {"dpo", "sft", "tie"} and sum(rates.values()) == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "Win rate of DPO over SFT (embedded judge, both orders)" in out
    assert "held-out reward accuracy" in out
    assert out.count("  sft: ") == out.count("  dpo: ") == 5
