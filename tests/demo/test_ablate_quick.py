"""`megafusion ablate --quick`: two arms of the section 5 grid on the tiny Llama produce the table, the plot and
the expected text scores (frozen text: perplexity unchanged; text trained at lr ratio 1: changed)."""

import json
import subprocess

import pytest

from tests.distributed import REPO, cpu_env, megafusion_command

pytestmark = pytest.mark.slow


def test_quick_ablation_table_and_plot(tmp_path):
    out = tmp_path / "ablate"
    cmd = megafusion_command(["ablate", "--quick", "--out", str(out), "--demo-out", str(tmp_path / "demo"),
                              "--steps", "3", "--separations", "ffn", "--ratios", "0,1"])
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("ablation.md", "ablation.json", "ablation.png"):
        assert (out / name).is_file(), name
    rows = {r["lr_ratio"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert set(rows) == {0.0, 1.0}
    assert rows[0.0]["perplexity_change"] == pytest.approx(0.0, abs=1e-6) and rows[0.0]["text_identical"]
    assert abs(rows[1.0]["perplexity_change"]) > 1e-4 and not rows[1.0]["text_identical"]
    assert "| ffn | 1 | 0 |" in (out / "ablation.md").read_text()
