"""moe.training.plots: PNGs from a run's metrics.jsonl, or one line and nothing without matplotlib."""

import builtins
import json

import pytest

from moe.training.data import TASKS
from moe.training.plots import smoothed, write_plots


def _run(tmp_path, with_tasks: bool):
    routing = [{"load": [0.5, 0.25, 0.25, 0.0]}, {"load": [0.25] * 4}]
    rows = [{"step": s, "ce": 5.0 - s, "routing": routing} for s in (1, 2, 3)]
    rows[-1]["repeat_share"] = 0.4  # a step with unlikelihood: its own panel
    evaluation = {"val_loss": 3.0, "val_bpb": 4.3, "compressors": {"gzip -9": 1.9, "xz -9": 1.55}}
    if with_tasks:
        evaluation["task_routing"] = [[[1, 2, 3, 4]] * len(TASKS)] * 2  # [layers, tasks, experts]
        evaluation.update(task_expert_mi_bits=[0.5, 0.4], task_expert_mi_given_token_bits=[0.2, 0.1],
                          task_expert_mi_given_token_shuffled_bits=[0.01, 0.01])
    rows.append({"step": 3, "eval": evaluation})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_a_task_mix_run_gets_loss_load_and_task_routing_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    written = write_plots(_run(tmp_path, with_tasks=True))
    assert [p.name for p in written] == ["loss.png", "expert_load.png", "task_routing.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_a_text_run_has_no_task_picture(tmp_path):
    pytest.importorskip("matplotlib")
    assert [p.name for p in write_plots(_run(tmp_path, with_tasks=False))] == ["loss.png", "expert_load.png"]


def test_without_matplotlib_one_line_and_no_files(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_plots(_run(tmp_path, with_tasks=False)) == []
    assert capsys.readouterr().out.count("\n") == 1 and not list(tmp_path.glob("*.png"))


def test_smoothing_keeps_a_constant_and_follows_a_jump_without_a_start_bias():
    assert smoothed([2.0] * 5) == pytest.approx([2.0] * 5)  # debiased: no pull towards 0 at the start
    jump = smoothed([0.0] * 10 + [1.0] * 60)
    assert jump[10] == pytest.approx(0.1 / (1 - 0.9 ** 11)) and 0.99 < jump[-1] < 1.0
