"""Build the n-gram draft of a trained target (moe/serving/ngram_draft.py) from its run's
training split, for `generate.py --ngram-draft` and `bench_speculative.py --ngram-draft`:
the target's argmax after each context (greedy requests) and its mean distribution after
the contexts seen at least twice (sampled requests).

Why a script and not part of train.py: the table is a product of the finished target
(its argmax over the training text and its own continuations), like a distilled draft
model, and takes about four minutes on 2 CPU threads for the main job (3.1M training
tokens, 2,000 continuations).

    .venv/bin/python scripts/build_ngram_draft.py runs/tiny    # -> runs/tiny/ngram_draft.safetensors
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.config import ConfigError  # noqa: E402
from moe.io.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from moe.io.files import CheckpointError  # noqa: E402
from moe.serving.ngram_draft import build_ngram_draft  # noqa: E402
from moe.tokenizer import TOKENIZER_FILE  # noqa: E402
from moe.training.data import prepare  # noqa: E402
from moe.training.run_folder import SETUP_FILE, resumed_setup  # noqa: E402

DRAFT_FILE = "ngram_draft.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the target's training run folder (its setup.json names the data)")
    parser.add_argument("--out", help=f"where the table goes (default RUN/{DRAFT_FILE})")
    parser.add_argument("--tokens", type=int, default=0, help="training tokens to read (0: all)")
    parser.add_argument("--max-order", type=int, default=4, help="longest context, in tokens")
    parser.add_argument("--continuations", type=int, default=2000,
                        help="prompts the target continues greedily, for its own contexts (0: none)")
    parser.add_argument("--dist-size", type=int, default=16,
                        help="tokens kept of the target's mean distribution after each context, which "
                             "sampled requests draw their proposals from (0: none)")
    parser.add_argument("--dist-min-count", type=int, default=2,
                        help="occurrences a context needs in the training text to keep a distribution")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", help="also write the build's figures (seconds per pass, contexts, "
                                         "peak memory) as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / SETUP_FILE).is_file():
        sys.exit(f"error: {run} is not a training run folder (no {SETUP_FILE}, which names the data): "
                 "give the target's run folder, e.g. runs/tiny")
    try:
        setup = resumed_setup(run, None, [])
        corpus = prepare(setup["data"], seed=setup["train"].seed, vocab_size=setup["model"].vocab_size)
        checkpoint = resolve_checkpoint(run)
        model = load_model(run).eval()
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    theirs, ours = corpus.folder / TOKENIZER_FILE, Path(checkpoint) / TOKENIZER_FILE
    if theirs.is_file() != ours.is_file() or (ours.is_file() and theirs.read_bytes() != ours.read_bytes()):
        sys.exit(f"error: the prepared data in {corpus.folder} was encoded with another tokenizer than "
                 f"{checkpoint}'s; prepare the run's data again (delete {corpus.folder})")
    tokens = corpus.train[:args.tokens] if args.tokens > 0 else corpus.train
    start = shown = time.perf_counter()
    finished: dict[str, float] = {}  # pass -> seconds since the start when it ended

    def progress(stage: str, done: int, total: int) -> None:  # about once a second
        nonlocal shown
        if time.perf_counter() - shown >= 1 or done == total:
            shown = time.perf_counter()
            if done == total:
                finished[stage] = shown - start
            print(f"\r{stage}: {done}/{total}, {shown - start:.0f} s", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    try:
        draft = build_ngram_draft(model, tokens, args.max_order, continuations=args.continuations,
                                  seed=setup["train"].seed, dist_size=args.dist_size,
                                  dist_min_count=args.dist_min_count, progress=progress)
    except ValueError as error:
        sys.exit(f"\nerror: {error}")
    out = Path(args.out) if args.out else run / DRAFT_FILE
    draft.save(out, {"checkpoint": str(checkpoint), "tokens": str(len(tokens)),
                     "continuations": str(args.continuations)})
    seconds = time.perf_counter() - start
    sizes = ", ".join(f"order {n}: {len(k):,}" for n, k in enumerate(draft.keys, start=1))
    dists = ", ".join(f"{len(k):,}" for k in draft.dist_keys) or "none"
    print(f"{out}: contexts {sizes} (with a distribution: {dists}), from {len(tokens):,} tokens and "
          f"{args.continuations} continuations in {seconds:.0f} s")
    if args.report:
        report = dict(command="python scripts/build_ngram_draft.py " + " ".join(sys.argv[1:]), table=str(out),
                      checkpoint=str(checkpoint), threads=args.threads, tokens=len(tokens),
                      continuations=args.continuations, max_order=args.max_order, seconds=seconds,
                      pass_ends_s=finished, contexts_per_order=[len(k) for k in draft.keys],
                      dist_size=args.dist_size, dist_min_count=args.dist_min_count,
                      distributions_per_order=[len(k) for k in draft.dist_keys],
                      file_bytes=out.stat().st_size,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures -> {args.report}")


if __name__ == "__main__":
    main()
