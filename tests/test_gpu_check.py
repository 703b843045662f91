"""The prepared GPU check (issue 26) runs end to end here before a GPU ever sees it: scripts/gpu_check.sh
--cpu-smoke on a tiny model in fp32, every part producing its figures.
    scripts/test.sh tests/test_gpu_check.py
"""
import json
import math
import os
import subprocess

from conftest import ROOT, child_env


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu-smoke", "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env=child_env({"OUT": str(out)}))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.load(open(out / "gpu_check.json"))
    parts = result["parts"]
    assert result["mode"] == "cpu-smoke" and result["facts"]["deepspeed"][0].isdigit()
    assert not [n for n, r in parts.items() if "error" in r or "skipped" in r], parts  # (TRL: the dev extra)
    correct = parts["correctness"]
    assert correct["pass"] and correct["first_loss_ln2"] and correct["loss_falls"], correct
    assert correct["shared_packed_float32_max_rel"] < 1e-5 and correct["cache_max_rel"] < 1e-5, correct
    train = parts["train_tiny"]
    assert train["precompute"]["tokens_per_s"] > 0 and train["zero3"]["tokens_per_s"] > 0
    assert abs(train["zero3"]["first_loss"] - math.log(2)) < 1e-4 and train["auto"]["peak_gib"] > 0
    assert 0 < train["response_fraction"] < 1 and train["zero3"]["mfu"] is None  # no GPU peak to divide by
    trl = parts["trl"]
    assert trl["dpo_ds_vs_trl_online"] > 0 and trl["dpo_ds_vs_trl_precompute"] > 0, trl
    assert all(parts["long_rows"][f"256_tiled_{t}"]["tokens_per_s"] > 0 for t in (False, True)), parts["long_rows"]
    assert "## correctness" in (out / "gpu_check.md").read_text()
