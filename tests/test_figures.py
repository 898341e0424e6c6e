"""scripts/draw_figures.py: every picture of the docs is drawn from the code as it is now."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "draw_figures.py"
FIGURES = ["expert_dispatch.png", "block_table.png", "engine_step.png", "speculative_round.png",
           "expert_parallel.png"]


def test_the_script_draws_all_five_figures(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("draw_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.draw_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(FIGURES)
    for name in FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
