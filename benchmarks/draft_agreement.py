"""How often a proposer's sampled token is the target's, and what reproducible seeds cost.

    python benchmarks/draft_agreement.py --target runs/tiny --draft runs/draft \
        --ngram-draft runs/tiny/ngram_draft.safetensors

Why: a sampled speculative round here keeps a proposal only where it equals the target's
own draw with the same noise (moe/serving/speculative.py), so that a seeded request gets
the same tokens with or without speculation. The rejection rule of Leviathan et al. (2023)
keeps the distribution but not the tokens, and accepts more often. How much more decides
whether reproducible seeds are what keeps sampled speculation from paying on this CPU
(README, "Speculative decoding"), so this measures both on the target's own text: along
its seeded continuations of the prompts bench_speculative.py uses (same seed, the same
tokens as its plain runs), at every generated position, p the target's distribution and q
each proposer's, both warped like the request (T = 1 unless --temperature):

- `coupled`: the chance the two draws agree under shared noise, exactly
  (`coupled_acceptance`): the α the speculative runs measure, there only at the positions
  a round reaches;
- `rejection`: sum_x min(p_x, q_x), the rejection rule's acceptance;
- `coupled_floor`: (1 - d) / (1 + d), what the coupling guarantees (Daliri, Musco and
  Suresh 2024), d the total variation distance; the rejection rule's is 1 - d;
- `tokens_per_round`: (1 - α^(γ+1)) / (1 - α) at γ 2, 4 and 6 for each α, what a round
  would keep if every proposal passed with the mean chance.

Proposers: the draft model (`draft`), the n-gram table (`ngram_draft`, at the positions
where it knows a distribution; `coverage` is their share) and, for scale, a proposer that
always guesses the target's own most likely token (`argmax`: what a perfect greedy draft
gets at T = 1). Results go to benchmarks/results/draft_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_speculative import (checkpoint_name, expected_tokens, load_ngram_table,  # noqa: E402
                                          stdlib_prompts)
from moe.io.checkpoint import load_model  # noqa: E402
from moe.serving.generation import generate  # noqa: E402
from moe.serving.sampling import SamplingParams, warp_probs  # noqa: E402
from moe.serving.speculative import coupled_acceptance  # noqa: E402
from moe.serving.text import load_tokenizer  # noqa: E402


def agreement(p, q) -> dict[str, list[float]]:
    """Per position of p, q [N, V]: the coupled and rejection acceptances and the coupling's floor."""
    d = 0.5 * (p - q).abs().sum(-1)  # [N] total variation distance
    return dict(coupled=coupled_acceptance(p, q).tolist(), rejection=torch.minimum(p, q).sum(-1).tolist(),
                coupled_floor=((1 - d) / (1 + d)).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runs/tiny")
    parser.add_argument("--draft", default="runs/draft")
    parser.add_argument("--ngram-draft", help="also measure this n-gram draft of the target (scripts/build_ngram_draft.py)")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/draft_agreement.json")
    args = parser.parse_args()
    if min(args.n_prompts, args.prompt_len, args.new_tokens) < 1 or not args.temperature > 0:
        sys.exit("error: --n-prompts, --prompt-len and --new-tokens must be at least 1, --temperature above 0 "
                 "(greedy proposals agree or not: bench_speculative.py measures them)")
    for path in (args.target, args.draft):
        if not Path(path).exists():
            sys.exit(f"error: {path} does not exist: train it first (README: Train, Speculative decoding) "
                     "or pass --target/--draft")
    torch.set_num_threads(args.threads)
    target, draft = load_model(args.target).eval(), load_model(args.draft).eval()
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        sys.exit(f"error: the draft's vocabulary ({draft.cfg.vocab_size}) is not the target's "
                 f"({target.cfg.vocab_size}): distil the draft from this target")
    if args.prompt_len + args.new_tokens > target.cfg.max_seq_len:
        sys.exit(f"error: --prompt-len + --new-tokens must fit the target's {target.cfg.max_seq_len} positions")
    table = load_ngram_table(args.ngram_draft, target.cfg.vocab_size) if args.ngram_draft else None
    prompts = stdlib_prompts(args.n_prompts, args.prompt_len, args.seed, load_tokenizer(args.target))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=args.temperature,
                            seed=args.seed)
    names = ["draft", "argmax"] + (["ngram_draft"] if table is not None else [])
    per_position = {name: dict(coupled=[], rejection=[], coupled_floor=[]) for name in names}
    positions = 0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            seq = prompt + generate(target, prompt, params)
            tokens = torch.tensor([seq])
            span = range(len(prompt) - 1, len(seq) - 1)  # positions whose next token was drawn
            p = warp_probs(target(tokens).logits[0, span.start:span.stop], params)  # [N, V]
            found = {"draft": (p, warp_probs(draft(tokens).logits[0, span.start:span.stop], params)),
                     "argmax": (p, torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float())}
            if table is not None:
                known = [(j, q) for j, t in enumerate(span) if (q := table.distribution(seq[:t + 1])) is not None]
                if known:
                    rows = torch.tensor([j for j, _ in known])
                    found["ngram_draft"] = (p[rows], warp_probs(torch.stack([q for _, q in known]), params))
            for name, (target_p, q) in found.items():
                for key, values in agreement(target_p, q).items():
                    per_position[name][key] += values
            positions += len(span)
            print(f"prompt {i + 1}/{len(prompts)}", flush=True)
    proposers = {}
    for name, values in per_position.items():
        means = {key: sum(v) / max(len(v), 1) for key, v in values.items()}
        proposers[name] = dict(**means, coverage=len(values["coupled"]) / positions,
                               tokens_per_round={rule: {g: expected_tokens(means[rule], g) for g in (2, 4, 6)}
                                                 for rule in ("coupled", "rejection")})
        print(f"{name:12s} coupled {means['coupled']:.3f} (floor {means['coupled_floor']:.3f})  "
              f"rejection {means['rejection']:.3f}  coverage {proposers[name]['coverage']:.2f}")
    result = dict(benchmark="draft_agreement", command="python " + " ".join(sys.argv), threads=args.threads,
                  target=args.target, target_checkpoint=checkpoint_name(args.target), draft=args.draft,
                  draft_checkpoint=checkpoint_name(args.draft), ngram_draft=args.ngram_draft,
                  n_prompts=args.n_prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  temperature=args.temperature, seed=args.seed, positions=positions, proposers=proposers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
