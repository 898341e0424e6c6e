"""Text for generation: a Mixtral folder's own tokenizer.json drives generate.py (prompt ids,
output text, stop strings, its EOS) and gives the same text as decoding moe.serving.generation's
greedy tokens with it; our byte-level tokenizer otherwise, or when `tokenizers` is missing;
streaming never shows half a character or the start of a stop string."""

import json
import shutil
import sys

import pytest
import torch

import generate as cli
from moe.io.checkpoint import load_model
from moe.serving.generation import generate, stream
from moe.serving.ngram_draft import build_ngram_draft
from moe.io.hf import save_hf
from moe.model.transformer import Transformer
from moe.serving.sampling import SamplingParams
from moe.serving.stopping import Detokenizer, visible_text
from moe.serving.text import load_tokenizer, text_pieces
from moe.tokenizer import decode, encode
from tests.conftest import tiny_config

NO_TOKENIZERS = "the `tokenizers` package is not installed (pip install -e .)"
TEXTS = ["the cat sat on the mat", "a dog ran after the cat", "hello world, hello moe",
         "the experts route every token"]
PROMPT = "the cat"


def train_tokenizer():
    """A SentencePiece-style BPE (Metaspace, like Mixtral's) trained on TEXTS: <s> 0, </s> 1."""
    tokenizers = pytest.importorskip("tokenizers", reason=NO_TOKENIZERS)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=64, show_progress=False,
                                             special_tokens=["<s>", "</s>", "<unk>"])
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def edit_config(folder, **changes):
    file = folder / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return folder


def export(model, folder, **config):
    """`model` as a Mixtral folder, config.json edited by `config`."""
    save_hf(model, folder)
    return edit_config(folder, **config)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(folder with config.json, weights and tokenizer.json, the tokenizer): a tiny model of
    ours with the tokenizer's vocabulary, weights widened so greedy text varies."""
    tok = train_tokenizer()
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.get_vocab_size())).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    folder = export(model, tmp_path_factory.mktemp("mixtral") / "hf", bos_token_id=0, eos_token_id=1)
    tok.save(str(folder / "tokenizer.json"))
    return folder, tok


def run(capsys, *args):
    """generate.py in this process: (stdout, stderr)."""
    cli.main_generate([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def greedy(folder, prompt, n, **params):
    return generate(load_model(folder), prompt, SamplingParams(max_new_tokens=n, **params))


def decoded(tok, ids, prompt=()):
    """The text `ids` add after `prompt`, as it reads in the whole text."""
    whole = tok.decode(list(prompt) + list(ids), skip_special_tokens=True)
    return whole[len(tok.decode(list(prompt), skip_special_tokens=True)):]


def serve(capsys, folder, tmp_path, *flags, **request):
    infile = tmp_path / "in.jsonl"
    infile.write_text(json.dumps({"prompt": PROMPT, **request}) + "\n")
    out, _ = run(capsys, "--ckpt", folder, "--prompt-file", infile, *flags)
    return json.loads(out)


# ---------------------------------------------------------------------------------------
# A Mixtral folder with tokenizer.json
# ---------------------------------------------------------------------------------------

def test_prompt_is_encoded_and_output_decoded_with_the_folders_tokenizer(mixtral, capsys,
                                                                         monkeypatch):
    folder, tok = mixtral
    prompts = []

    def recording_stream(model, prompt, params, detok, compile=False):
        prompts.append(prompt)
        return stream(model, prompt, params, detok, compile)

    monkeypatch.setattr(cli, "stream", recording_stream)
    out, err = run(capsys, "--ckpt", folder, "--prompt", PROMPT, "--bos", "--max-new-tokens", 20,
                   "--ignore-eos")
    ids = [0] + tok.encode(PROMPT, add_special_tokens=False).ids
    assert prompts == [ids]
    assert out == decoded(tok, greedy(folder, ids, 20, ignore_eos=True), ids) + "\n"
    assert f"tokenizer: {folder / 'tokenizer.json'}" in err


def proposer_flags(mode: str, folder, tmp_path) -> list:
    """The command-line flags of a mode's proposer; the n-gram draft is built here."""
    if mode.endswith("prompt-lookup"):
        return ["--prompt-lookup"]
    if mode.endswith("ngram-draft"):
        model = load_model(folder)
        tokens = torch.randint(0, model.cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
        build_ngram_draft(model, tokens.numpy(), max_order=2, window=32, continuations=4, prompt_len=8,
                          new_tokens=8).save(tmp_path / "table.safetensors")
        return ["--ngram-draft", tmp_path / "table.safetensors"]
    return []


@pytest.mark.parametrize("mode", ["stream", "prompt-lookup", "ngram-draft", "compiled-ngram-draft", "engine",
                                  "engine-prompt-lookup", "engine-ngram-draft"])
def test_stop_string_cuts_the_text_where_it_starts(mixtral, capsys, tmp_path, mode):
    folder, tok = mixtral
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    full = decoded(tok, greedy(folder, prompt, 24, ignore_eos=True), prompt)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # may start inside a token
    expected = full[:full.find(stop)]
    assert 0 < len(expected) < len(full) - 3
    flags = proposer_flags(mode, folder, tmp_path)
    if mode.startswith("engine"):
        result = serve(capsys, folder, tmp_path, *flags, max_new_tokens=24, ignore_eos=True, stop=stop)
        assert (result["text"], result["finish_reason"]) == (expected, "stop")
    else:
        compiled = ["--compile"] if mode.startswith("compiled") else []  # the target's verify step
        out, err = run(capsys, "--ckpt", folder, "--prompt", PROMPT, "--max-new-tokens", 24,
                       "--ignore-eos", "--stop", stop, *flags, *compiled)
        assert out == expected + "\n"
        assert ("[compile: the verify step compiled" in err) == bool(compiled)


def test_eos_id_from_config_json_stops_generation(mixtral, capsys, tmp_path):
    folder, tok = mixtral
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    tokens = greedy(folder, prompt, 24, ignore_eos=True)
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])  # a new token
    edit_config(shutil.copytree(folder, tmp_path / "hf"), eos_token_id=tokens[k])
    result = serve(capsys, tmp_path / "hf", tmp_path, max_new_tokens=24)
    assert (result["finish_reason"], result["output_tokens"]) == ("eos", k + 1)
    assert result["text"] == decoded(tok, tokens[:k + 1], prompt)
    out, _ = run(capsys, "--ckpt", tmp_path / "hf", "--prompt", PROMPT, "--max-new-tokens", 24)
    assert out == decoded(tok, tokens[:k + 1], prompt) + "\n"


def test_generated_text_keeps_the_space_it_has_after_the_prompt(mixtral):
    folder, tok = mixtral
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    generated = tok.encode(PROMPT + " sat on", add_special_tokens=False).ids[len(prompt):]
    assert tok.decode(generated) == "sat on"  # alone, a SentencePiece decoder drops the space
    detok = load_tokenizer(folder).detokenizer(prompt)
    assert visible_text(generated, SamplingParams(), detok) == " sat on"


def test_bos_is_refused_when_the_tokenizer_has_none(mixtral, tmp_path):
    folder, tok = mixtral
    edit_config(shutil.copytree(folder, tmp_path / "hf"), bos_token_id=None)
    with pytest.raises(SystemExit, match="--bos.*no BOS id"):
        cli.main_generate(["--ckpt", str(tmp_path / "hf"), "--prompt", PROMPT, "--bos"])


# ---------------------------------------------------------------------------------------
# Ours: bytes
# ---------------------------------------------------------------------------------------

def test_tokenizer_json_without_tokenizers_falls_back_to_bytes_with_a_warning(
        make_model, capsys, tmp_path, monkeypatch):
    model = make_model()
    folder = export(model, tmp_path / "hf")
    (folder / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` fails
    with pytest.warns(UserWarning, match="tokenizer.json is ignored.*`tokenizers`"):
        out, err = run(capsys, "--ckpt", folder, "--prompt", "hi", "--max-new-tokens", 8,
                       "--ignore-eos")
    tokens = generate(model, encode("hi"), SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert out == decode(tokens) + "\n"
    assert "tokenizer: bytes" in err


def test_byte_tokenizer_is_refused_for_a_smaller_vocabulary_naming_both(make_model, tmp_path):
    folder = export(make_model(vocab_size=64), tmp_path / "hf")
    with pytest.raises(SystemExit, match="has 259 ids but the model's vocab_size is 64"):
        cli.main_generate(["--ckpt", str(folder), "--prompt", "hi"])


def test_tokenizer_is_bytes_without_tokenizer_json(tmp_path):
    tok = load_tokenizer(tmp_path)
    assert (tok.source, tok.vocab_size) == ("bytes", 259)
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_tokenizer_json_is_used_when_tokenizers_is_installed(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason=NO_TOKENIZERS)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1]}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.source.endswith("tokenizer.json") and loaded.vocab_size == 5
    assert loaded.encode("hello world hello") == [3, 4, 3]
    assert loaded.decode([3, 4]) == "hello world"
    assert (loaded.bos_id, loaded.eos_id) == (0, 1)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))
    several = load_tokenizer(tmp_path)
    assert several.eos_id == (1, 4) and several.detokenizer().eos_ids == (1, 4)


# ---------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------

def pieces_and_shown(tokens, params, detok=Detokenizer()):
    pieces = list(text_pieces(tokens, params, detok))
    return pieces, ["".join(pieces[:i + 1]) for i in range(len(pieces))]


def test_streamed_bytes_never_show_half_a_character():
    params = SamplingParams()
    tokens = encode("a€b😀")
    pieces, shown = pieces_and_shown(tokens, params)
    assert "".join(pieces) == visible_text(tokens, params) == "a€b😀"
    assert not any("\ufffd" in s for s in shown)


def test_streamed_text_never_shows_the_start_of_a_stop_string():
    words = ["hel", "lo w", "orld\n", "\nbye"]  # a tokenizer whose tokens are these strings
    params = SamplingParams(stop=("\n\n",))
    detok = Detokenizer(decode=lambda ids: "".join(words[i] for i in ids))
    pieces, shown = pieces_and_shown(range(len(words)), params, detok)
    assert "".join(pieces) == visible_text(list(range(len(words))), params, detok) == "hello world"
    assert not any(s.endswith("\n") for s in shown)


def test_an_imported_model_exported_again_keeps_its_special_ids_and_tokenizer(mixtral, tmp_path):
    from moe.io.checkpoint import load_model
    folder, tok = mixtral
    again = save_hf(load_model(folder), tmp_path / "again")
    config = json.loads((again / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    generation = json.loads((again / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    exported = load_tokenizer(again)
    assert exported.eos_id == 1 and exported.encode("hello") == load_tokenizer(folder).encode("hello")
    transformers = pytest.importorskip("transformers")
    loaded = transformers.GenerationConfig.from_pretrained(again)  # what transformers stops on
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 1)


def test_a_run_trained_with_a_learned_bpe_generates_and_exports_with_it(tmp_path, capsys):
    pytest.importorskip("tokenizers", reason=NO_TOKENIZERS)
    import train
    from moe.tokenizer import BOS, EOS
    data = tmp_path / "code"
    data.mkdir()
    for i in range(30):
        (data / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 8)
    run = tmp_path / "run"
    train.main(["--config", "configs/tiny.toml", "--out", str(run), "--quiet", "--sample", "def ",
                *[f"--set={s}" for s in (f"data.source={json.dumps(str(data))}",
                                         f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                                         "model.vocab_size=300", "model.d_model=32", "model.n_layers=1",
                                         "model.n_heads=2", "model.d_expert=16", "model.n_experts=4",
                                         "train.max_steps=2", "train.batch_size=2", "train.seq_len=16",
                                         "train.eval_every=2", "train.checkpoint_every=2",
                                         "train.unlikelihood_steps=0")]])
    assert (run / "ckpt" / "step_000002" / "tokenizer.json").is_file()
    tok = load_tokenizer(run)
    assert tok.source.endswith("tokenizer.json") and (tok.bos_id, tok.eos_id) == (BOS, EOS)
    assert len(tok.encode("    return x * 3")) < len("    return x * 3")  # merged tokens, not bytes
    cli.main_generate(["--ckpt", str(run), "--prompt", "def f1(x):", "--max-new-tokens", "5"])
    assert "tokenizer: " + tok.source in capsys.readouterr().err
    exported = save_hf(load_model(run), tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)
    assert load_tokenizer(exported).encode("def f1(x):") == tok.encode("def f1(x):")
