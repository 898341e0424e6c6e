import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_loop_script_scores_greedy_continuations_beside_the_text_and_refuses_a_non_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in range(12):  # files, so that some fall in the validation split
        (data / f"f{f}.py").write_text("".join(f"x_{f}_{i} = {i * i}  # value {i}\n" for i in range(60)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = [f"data.source={json.dumps(str(data))}", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                'data.tokenizer="bytes"', "data.val_fraction=0.5", "model.vocab_size=259", "model.n_layers=1",
                "model.d_model=32", "model.n_heads=2", "model.d_expert=32", "model.n_experts=4",
                "train.max_steps=2", "train.batch_size=2", "train.seq_len=16", "train.eval_every=2",
                "train.eval_batches=1"]
    trained = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.toml", "--out", str(run),
                              "--quiet", *[f"--set={s}" for s in settings]],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr

    def loops(*args):
        return subprocess.run([sys.executable, "scripts/greedy_loops.py", *map(str, args), "--threads", "1"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
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
