"""scripts/tour.py: the whole story runs end to end at toy size and its report quotes what
the steps wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_tour_runs_every_step_and_writes_a_report_from_their_files(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tour"
    done = subprocess.run([sys.executable, "scripts/tour.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (out / "report.md").read_text()
    for heading in ("## 1. What was trained", "## 2. How well it learned", "## 3. How the experts are used",
                    "## 4. Serving it", "## 5. Speculative decoding", "## 6. The same design at GPT-4's scale"):
        assert heading in report
    evaluation = [json.loads(line)["eval"] for line in (out / "target" / "metrics.jsonl").read_text().splitlines()
                  if "eval" in line][-1]
    assert f"{evaluation['val_bpb']:.3f} bits per byte" in report
    serving = json.loads((out / "serving.json").read_text())
    assert f"{serving['comparisons'][0]['throughput_ratio']:.2f}x" in report
    assert "$0.0049" in report and (out / "target" / "loss.png").is_file()
    for command in ("train.py --config configs/tiny.toml", "generate.py bench", "bench_speculative.py"):
        assert command in done.stdout  # each step is printed before it runs


def test_a_failing_step_stops_the_tour_naming_its_command_and_log(tmp_path):
    out = tmp_path / "tour"
    out.mkdir()
    (out / "target").write_text("a file where the target's run folder should go")
    done = subprocess.run([sys.executable, "scripts/tour.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "train.py --config configs/tiny.toml" in done.stderr and str(out / "logs" / "target.log") in done.stderr
    assert not (out / "report.md").exists()
