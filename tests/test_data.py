"""moe.training.data: preparation is deterministic and cached, the split is by file, batches are a
function of (seed, index), and the synthetic tasks are right and scored on answers only."""

import re

import numpy as np
import pytest

from moe.config import ConfigError, DataConfig
from moe.training.data import (TASKS, get_batch, is_validation_file, make_example, prepare, source_files,
                      task_batch)
from moe.tokenizer import BOS, EOS, decode


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(40):
        (folder / f"file{i:02d}.txt").write_text(f"file number {i}\n" + "hello world " * (i + 5))
    return folder


def test_preparation_is_deterministic_and_reused(text_folder, tmp_path):
    first = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path / "a"), val_fraction=0.2))
    again = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path / "a"), val_fraction=0.2))
    other = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path / "b"), val_fraction=0.2))
    assert first.folder == again.folder
    assert np.array_equal(first.train, other.train) and np.array_equal(first.val, other.val)
    assert len(list((tmp_path / "a").iterdir())) == 1  # prepared once, no leftover temporaries


def test_split_is_by_whole_file(text_folder, tmp_path):
    corpus = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path), val_fraction=0.2))
    train_text, val_text = decode(corpus.train.tolist()), decode(corpus.val.tolist())
    val_files = [f for f in sorted(text_folder.iterdir()) if is_validation_file(f.name, 0.2)]
    assert 0 < len(val_files) < 40
    for f in sorted(text_folder.iterdir()):
        in_val = f.read_text() in val_text
        assert in_val == (f in val_files)
        assert (f.read_text() in train_text) != in_val
    assert int((corpus.train == EOS).sum()) + int((corpus.val == EOS).sum()) == 40


def test_a_single_file_holds_out_its_tail(tmp_path):
    file = tmp_path / "one.txt"
    file.write_text("abcdefghij" * 100)
    corpus = prepare(DataConfig(source=str(file), cache_dir=str(tmp_path / "c"), val_fraction=0.1))
    assert len(corpus.val) == 101 and len(corpus.train) == 901  # each part ends in EOS


def test_glob_and_missing_source(text_folder):
    _, files = source_files(str(text_folder / "file0*.txt"))
    assert len(files) == 10
    with pytest.raises(ConfigError, match="data.source"):
        source_files(str(text_folder / "nothing*.md"))


def test_stdlib_corpus_is_real_python_source():
    root, files = source_files("stdlib")
    assert len(files) > 200 and (root / "os.py") in files
    assert not any("site-packages" in f.parts for f in files)


def test_batches_are_a_function_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    inputs, targets = get_batch(tokens, 16, 4, seed=3, index=7)
    again, _ = get_batch(tokens, 16, 4, seed=3, index=7)
    other, _ = get_batch(tokens, 16, 4, seed=3, index=8)
    assert inputs.shape == (4, 16) and (inputs == again).all() and not (inputs == other).all()
    assert (targets == inputs + 1).all()


def test_too_little_data_names_the_fix():
    with pytest.raises(ConfigError, match="train.seq_len"):
        get_batch(np.arange(10, dtype=np.uint16), 16, 2, seed=0, index=0)


def test_task_answers_are_correct():
    import random
    rng = random.Random(0)
    for _ in range(50):
        for task in TASKS:
            prompt, answer = make_example(task, rng)
            body = prompt[len(task) + 1:-1]
            if task == "copy":
                assert answer == body
            elif task == "reverse":
                assert answer == body[::-1]
            elif task == "sort":
                assert answer == "".join(sorted(body))
            elif task == "add":
                a, b = map(int, body.split("+"))
                assert int(answer) == a + b
            else:
                key, pairs = re.fullmatch(r"(\w) in (.*)", body).groups()
                assert dict(p.split("=") for p in pairs.split(","))[key] == answer


def test_task_batch_scores_only_the_answer(tmp_path):
    corpus = prepare(DataConfig(source="tasks", cache_dir=str(tmp_path), task_examples=100, val_fraction=0.1))
    assert corpus.is_tasks and len(corpus.val_examples) == 10
    assert len(corpus.train_task_ids) == len(corpus.train)
    inputs, targets, tasks = task_batch(corpus, np.arange(5))
    assert tasks.tolist() == [TASKS.index(t) for t in TASKS]  # examples cycle through the tasks
    for row_in, row_target, (_, prompt_len, length) in zip(inputs, targets, corpus.val_examples[:5]):
        assert row_in[0] == BOS
        prompt = decode(row_in[:prompt_len].tolist())
        answer = decode(row_target[row_target != -100].tolist())
        task, body = prompt.split(" ", 1)
        assert prompt.endswith("|") and row_target[row_target != -100][-1] == EOS
        assert (row_target != -100).sum() == length - prompt_len
        if task == "reverse":
            assert answer == body[:-1][::-1]


def test_a_bpe_is_learned_on_the_training_files_and_codes_them_exactly(text_folder, tmp_path):
    from moe.tokenizer import load_bpe
    corpus = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path), val_fraction=0.2,
                                tokenizer="bpe"), vocab_size=300)
    tok = load_bpe(corpus.tokenizer_file)
    assert corpus.train.max() >= 259  # merged tokens in use
    val_files = [f for f in sorted(text_folder.iterdir()) if is_validation_file(f.name, 0.2)]
    pieces = np.split(corpus.val, np.flatnonzero(corpus.val == EOS) + 1)[:-1]
    assert [tok.decode(p.tolist()) for p in pieces] == [f.read_text() for f in val_files]
    assert int(corpus.token_bytes[corpus.val].sum()) == sum(len(f.read_bytes()) for f in val_files)
    bytes_only = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path), val_fraction=0.2))
    assert bytes_only.folder != corpus.folder and bytes_only.tokenizer_file is None


def test_a_bpe_needs_a_vocabulary_size_and_text(tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size"):
        prepare(DataConfig(source="stdlib", cache_dir=str(tmp_path), tokenizer="bpe"))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        DataConfig(source="tasks", tokenizer="bpe")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        DataConfig(tokenizer="wordpiece")


def test_the_compressor_bars_are_gzip_and_xz_on_the_validation_bytes(text_folder, tmp_path):
    import lzma
    import zlib
    corpus = prepare(DataConfig(source=str(text_folder), cache_dir=str(tmp_path), val_fraction=0.2))
    data = b"".join(f.read_bytes() for f in sorted(text_folder.iterdir()) if is_validation_file(f.name, 0.2))
    assert corpus.compressors == {"gzip -9": 8 * len(zlib.compress(data, 9)) / len(data),
                                  "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data)}


def test_task_training_windows_start_at_an_example_and_score_answers_only(tmp_path):
    from moe.training.data import training_batch
    corpus = prepare(DataConfig(source="tasks", cache_dir=str(tmp_path), task_examples=200, val_fraction=0.1))
    inputs, targets = training_batch(corpus, 64, 8, seed=0, index=3)
    again, _ = training_batch(corpus, 64, 8, seed=0, index=3)
    assert (inputs == again).all() and (inputs[:, 0] == BOS).all()
    for row_in, row_target in zip(inputs, targets):
        scored, in_answer = [], False
        for token in row_in.tolist():  # a target is scored from the prompt's '|' to its EOS
            in_answer = (in_answer or token == ord("|")) and token != EOS
            scored.append(in_answer)
        assert (row_target != -100).tolist() == scored and any(scored)
        assert (row_target[row_target != -100] != BOS).all()


def test_task_weights_shape_the_training_mix_and_leave_the_held_out_examples_balanced(tmp_path):
    corpus = prepare(DataConfig(source="tasks", cache_dir=str(tmp_path), task_examples=2000, val_fraction=0.1,
                                task_weights="add=4"))
    starts = corpus.train_examples
    shares = np.bincount(corpus.train_task_ids[starts], minlength=len(TASKS)) / len(starts)
    assert shares[TASKS.index("add")] == pytest.approx(0.5, abs=0.05)  # 4 of 8
    assert np.bincount(corpus.val_example_tasks, minlength=len(TASKS)).tolist() == [40] * len(TASKS)
    for bad in ("add=0", "multiply=2", "add"):
        with pytest.raises(ConfigError, match="data.task_weights"):
            prepare(DataConfig(source="tasks", cache_dir=str(tmp_path), task_weights=bad))
