import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as cli
from moe.cli import run_main
from moe.config import ConfigError
from moe.io.checkpoint import save_model
from moe.serving.engine import EngineConfig
from moe.serving.generation import generate
from moe.serving.ngram_draft import NgramProposer, build_ngram_draft
from moe.serving.sampling import SamplingParams
from moe.serving.speculative_engine import SpeculativeEngine
from moe.tokenizer import decode, encode
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from moe.model.transformer import Transformer
    torch.manual_seed(5)
    model = Transformer(tiny_config()).eval()
    path = save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny")
    return model, path


def run_cli(*args):
    result = subprocess.run([sys.executable, "generate.py", *map(str, args), "--threads", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_prompt_streams_the_greedy_completion(checkpoint):
    model, path = checkpoint
    out = run_cli("--ckpt", path, "--prompt", "hello", "--max-new-tokens", 12, "--ignore-eos")
    expected = decode(generate(model, encode("hello"), SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert out == expected + "\n"


def test_prompt_file_serves_every_line_and_refuses_bad_ones_by_reason(checkpoint, tmp_path):
    model, path = checkpoint
    lines = [
        {"prompt": "abc", "max_new_tokens": 8, "ignore_eos": True},
        {"prompt": "", "max_new_tokens": 4},
        {"prompt": "xyz", "max_new_tokens": 5, "temperature": 0.9, "seed": 1, "ignore_eos": True},
        {"prompt": "q", "top_p": 2.0},
        {"prompt": "q", "colour": "red"},
        {"prompt": "q", "temperature": "hot"},
    ]
    infile, outfile = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    run_cli("--ckpt", path, "--prompt-file", infile, "--out", outfile)
    results = [json.loads(x) for x in outfile.read_text().splitlines()]  # as each finished
    results.sort(key=lambda r: r["line"])
    assert [r["line"] for r in results] == [1, 2, 3, 4, 5, 6, 7]
    greedy = generate(model, encode("abc"), SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert results[0]["text"] == decode(greedy) and results[0]["finish_reason"] == "length"
    assert results[2]["output_tokens"] == 5
    assert [r["status"] for r in results] == ["finished", "refused", "finished"] + ["refused"] * 4
    assert "empty" in results[1]["refusal"] and "top_p" in results[3]["refusal"]
    assert "colour" in results[4]["refusal"] and "temperature" in results[5]["refusal"]
    assert "line 7" in results[6]["refusal"]


def test_bench_writes_both_modes_in_the_agreed_schema(tmp_path):
    out = tmp_path / "bench.json"
    # vocab 64: fewer ids than our byte tokenizer, as a Hugging Face model may have
    run_cli("bench", "--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.n_experts=4",
            "--set", "model.vocab_size=64", "--n-requests", 6, "--prompt-len", 4, "--mean-output", 4, "--max-output", 8,
            "--slots", 2, "--repeats", 1, "--out", out)
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["dtype"] == "float32"
    assert results["model"]["n_layers"] == 1
    assert sorted(r["mode"] for r in results["runs"]) == ["continuous", "static"]
    for run in results["runs"]:
        assert run["n_requests"] == 6 and run["mean_prompt_len"] == 4
        assert run["output_tokens_per_s"] > 0 and run["requests_per_s"] > 0 and run["mean_batch"] >= 1
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(run[key]) == {"mean", "p50", "p90", "p99"}
            assert run[key]["p50"] <= run[key]["p99"]
    assert results["comparisons"][0]["step_ceiling"] >= 1


def run_all(cases: dict[str, list]) -> dict[str, subprocess.CompletedProcess]:
    """generate.py once per case, all at the same time (each start imports torch)."""
    running = {name: subprocess.Popen([sys.executable, "generate.py", *map(str, args), "--threads", "1"],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in cases.items()}
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def test_user_errors_print_the_fix_and_exit_2_without_a_traceback(checkpoint, tmp_path):
    _, path = checkpoint
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    cases = {  # a piece of the message -> the command line
        "config.json not found": ["--ckpt", tmp_path / "nonexistent", "--prompt", "hi"],
        "engine.max_num_batched_tokens must be at least 1":
            ["--ckpt", path, "--prompt-file", prompts, "--max-num-batched-tokens", 0],
        "--device 'foo' is not a torch device": ["--ckpt", path, "--prompt", "hi", "--device", "foo"],
        "config file nope.toml does not exist": ["bench", "--config", "nope.toml"],
        "--slots must each be at least 1": ["bench", "--set", "model.n_layers=1", "--slots", 0],
        "--draft and --prompt-lookup are different ways": ["--ckpt", path, "--prompt-file", prompts,
                                                           "--prompt-lookup", "--draft", path],
        "--prompt-lookup and --ngram-draft are different ways": ["--ckpt", path, "--prompt", "hi", "--prompt-lookup",
                                                                 "--ngram-draft", tmp_path / "t.safetensors"],
        "build_ngram_draft.py": ["--ckpt", path, "--prompt", "hi", "--ngram-draft", tmp_path / "none.safetensors"],
        "--adaptive changes γ of speculative decoding": ["--ckpt", path, "--prompt-file", prompts, "--adaptive"],
    }
    for message, result in run_all(cases).items():
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert result.stderr.startswith("error:") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_only_user_errors_lose_their_traceback(capsys):
    def refuse(argv):
        raise ConfigError("model.n_layers must be at least 1, got 0")

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(SystemExit) as exit_:
        run_main(refuse, [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: model.n_layers must be at least 1, got 0\n"
    with pytest.raises(KeyError):
        run_main(bug, [])


def test_engine_flags_default_to_the_engine_config():
    parser = argparse.ArgumentParser()
    cli.add_engine_args(parser)
    assert EngineConfig(**cli.engine_settings(parser.parse_args([]))) == EngineConfig()


def test_the_default_dtype_is_the_checkpoints_own(tmp_path):
    from moe.io.checkpoint import save_model
    from moe.model.transformer import Transformer
    from tests.conftest import tiny_config
    half = save_model(Transformer(tiny_config()).to(torch.bfloat16), tmp_path / "bf16")
    full = save_model(Transformer(tiny_config()), tmp_path / "fp32")
    assert cli.default_dtype(str(half), "cpu") == "bfloat16"  # not upcast to float32
    assert cli.default_dtype(str(full), "cpu") == "float32"
    assert cli.default_dtype(str(full), "cuda") == "bfloat16"  # float32 runs in bf16 on a GPU
    assert cli.default_dtype(None, "cpu") == "float32"


def test_prompt_file_with_a_draft_gives_plain_greedy_text_and_prints_the_speculative_statistics(checkpoint, tmp_path):
    model, path = checkpoint
    infile, outfile = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text(json.dumps({"prompt": "abc", "max_new_tokens": 8, "ignore_eos": True}) + "\n")
    result = subprocess.run([sys.executable, "generate.py", "--ckpt", str(path), "--draft", str(path),
                             "--prompt-file", str(infile), "--out", str(outfile), "--threads", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(x) for x in outfile.read_text().splitlines()]
    assert row["text"] == decode(generate(model, encode("abc"), SamplingParams(max_new_tokens=8, ignore_eos=True)))
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["target_calls"] >= 1 and stats["acceptance_rate"] == 1.0  # the draft is the target itself


def test_a_draft_with_a_prompt_streams_each_rounds_tokens_as_they_are_kept(checkpoint, capsys, monkeypatch):
    model, path = checkpoint
    writes = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda text: writes.append(text) or real_write(text))
    cli.main_generate(["--ckpt", str(path), "--draft", str(path), "--speculate", "2", "--prompt", "hello",
                       "--max-new-tokens", "12", "--ignore-eos"])
    out = capsys.readouterr().out
    expected = decode(generate(model, encode("hello"), SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert out == expected + "\n"
    assert len([w for w in writes if w]) > 2  # several pieces, not one write at the end


def test_serve_speculates_with_the_ngram_draft_and_refuses_two_proposers(checkpoint, tmp_path):
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    model, path = checkpoint
    text = torch.randint(0, model.cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).numpy()
    build_ngram_draft(model, text, max_order=2, window=32, continuations=0).save(tmp_path / "table.safetensors")
    table = ["--ngram-draft", str(tmp_path / "table.safetensors")]
    _, loop, *_ = cli.build_server(["--ckpt", str(path), *table, "--speculate", "5", "--threads", "1"])
    engine = loop.engine
    assert isinstance(engine, SpeculativeEngine) and isinstance(engine.lookup, NgramProposer) and engine.gamma == 5
    with pytest.raises(ValueError, match="--prompt-lookup and --ngram-draft are different ways"):
        cli.build_server(["--ckpt", str(path), "--prompt-lookup", *table])


def test_a_table_without_distributions_still_speculates_and_says_to_rebuild_it(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    text = torch.randint(0, model.cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).numpy()
    build_ngram_draft(model, text, max_order=2, window=32, continuations=0, dist_size=0).save(tmp_path / "old.safetensors")
    cli.main_generate(["--ckpt", str(path), "--ngram-draft", str(tmp_path / "old.safetensors"), "--prompt", "hello",
                       "--temperature", "1", "--seed", "4", "--max-new-tokens", "12", "--ignore-eos"])
    captured = capsys.readouterr()
    params = SamplingParams(temperature=1.0, seed=4, max_new_tokens=12, ignore_eos=True)
    assert captured.out == decode(generate(model, encode("hello"), params)) + "\n"
    assert "holds no distributions" in captured.err and "build_ngram_draft.py" in captured.err
