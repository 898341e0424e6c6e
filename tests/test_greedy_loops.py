import json
import subprocess
import sys

from tests.conftest import ONE_THREAD, ROOT, train_tiny_run


def test_the_loop_script_scores_greedy_continuations_beside_the_text_and_refuses_a_non_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in range(12):  # files, so that some fall in the validation split
        (data / f"f{f}.py").write_text("".join(f"x_{f}_{i} = {i * i}  # value {i}\n" for i in range(60)))
    run = tmp_path / "run"
    train_tiny_run(run, data, tmp_path / "cache", "data.val_fraction=0.5")

    def loops(*args):
        return subprocess.run([sys.executable, "scripts/greedy_loops.py", *map(str, args), "--threads", "1"],
                              cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    out = tmp_path / "loops.json"
    done = loops(run, "--prompts", 3, "--out", out)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(out.read_text())["runs"]
    # the file's own continuations are varied code; two steps of training write a loop or near one
    assert row["validation_text"]["loop_share"] == 0 and row["validation_text"]["mean"] > 0.3
    assert len(row["looping_examples"]) == round(3 * row["greedy"]["loop_share"])  # each loop, shown
    texts = [f.read_text() for f in data.iterdir()]
    assert all(any(e["prompt"] in t for t in texts) for e in row["looping_examples"])  # prompts from the files
    refused = loops(tmp_path)
    assert refused.returncode != 0 and refused.stderr.startswith("error:") and "setup.json" in refused.stderr
