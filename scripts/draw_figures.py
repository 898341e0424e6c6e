"""Pictures for the docs, drawn by running the project's own code on small examples.

Why a script and not hand-drawn diagrams: a diagram drawn by hand says what the code did
the day it was drawn. Each picture here is built from the real data structures, on a
small seeded example: `route` and `align_slots` sort the slots of the dispatch picture,
a real `PagedKVCache` hands out the blocks of the block-table picture and lays out the
ragged step, `accept` accepts and rejects the speculative proposals, and the expert-
parallel counts are grouped the way `ExpertParallelMoE.run_experts` groups them. When the
code changes, rerunning this redraws the pictures, so they cannot drift from it; where a
picture relies on a fact (a slot is dropped, a proposal is rejected), the script checks
it and stops with a message if the code no longer does that. Seeded and drawn with the
Agg backend, the same code gives the same PNGs.

    .venv/bin/python scripts/draw_figures.py                  # -> docs/figures/*.png
    .venv/bin/python scripts/draw_figures.py --out /tmp/figures

Files: expert_dispatch.png, block_table.png, engine_step.png, speculative_round.png,
expert_parallel.png (about 100 dpi). Drawing units: one unit is half an inch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's packages, also from a checkout that is not installed

from kernels.moe_dispatch import align_slots, expert_counts  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.model.moe_layer import expert_capacity, route  # noqa: E402
from moe.serving.blocks import BlockManager  # noqa: E402
from moe.serving.cache import PagedKVCache  # noqa: E402
from moe.serving.sampling import sample_at  # noqa: E402
from moe.serving.speculative import accept  # noqa: E402

DPI = 100
INCHES_PER_UNIT = 0.5
EXPERT_COLOURS = ["#8dd3c7", "#fdb462", "#bebada", "#80b1d3", "#b3de69", "#fccde5", "#ffffb3",
                  "#fb8072"]  # ColorBrewer Set3: black text stays legible
SEQUENCE_COLOURS = ["#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3", "#a6d854"]  # ColorBrewer Set2
FREE = "#e6e6e6"
ACCEPTED, REJECTED, RESAMPLED, BONUS, UNCHECKED = "#4daf4a", "#e41a1c", "#ff9f1c", "#984ea3", "#d9d9d9"


# ---------------------------------------------------------------------------------------
# Drawing helpers: one axis per picture, units of half an inch, y growing downwards
# ---------------------------------------------------------------------------------------

def canvas(width: float, height: float):
    """A figure of width x height units with one bare axis covering it (y points down)."""
    fig = plt.figure(figsize=(width * INCHES_PER_UNIT, height * INCHES_PER_UNIT))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    return fig, ax


def box(ax, x: float, y: float, w: float, h: float, colour: str, text: str = "", size: float = 8,
        hatch: str | None = None, edge: str = "black", crossed: bool = False, lw: float = 0.8) -> None:
    """A filled rectangle with its top-left corner at (x, y), text centred, optionally crossed out."""
    ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor=edge, hatch=hatch, lw=lw))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)
    if crossed:
        ax.plot([x + 0.08, x + w - 0.08], [y + 0.08, y + h - 0.08], color=REJECTED, lw=1.6)
        ax.plot([x + 0.08, x + w - 0.08], [y + h - 0.08, y + 0.08], color=REJECTED, lw=1.6)


def arrow(ax, start: tuple[float, float], end: tuple[float, float], colour: str = "#555555",
          lw: float = 0.9) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, color=colour,
                                 lw=lw, shrinkA=1, shrinkB=1))


def save(fig, path: Path) -> Path:
    """PNG without the matplotlib version in its metadata, so reruns give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def require(ok: bool, what: str) -> None:
    """Stop when the example no longer shows what its picture claims (the code changed)."""
    if not ok:
        raise RuntimeError(f"draw_figures: {what}; the code changed under this example, adjust it")


# ---------------------------------------------------------------------------------------
# 1. Expert dispatch: slots in token order -> one contiguous run per expert, capacity drops
# ---------------------------------------------------------------------------------------

N_TOKENS, N_EXPERTS, TOP_K, BLOCK_M = 10, 4, 2, 4
CAPACITY_FACTOR = 1.25
EXPERT_BIAS = [1.2, 0.4, 0.0, -0.4]  # router logit offsets: expert 0 is popular and overflows


def dispatch_example(seed: int = 0) -> dict:
    """Route N tokens top-K over E experts with a capacity limit and align the slots the
    way the Triton dispatch does; which slots were kept, padded and dropped."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N_TOKENS, N_EXPERTS, generator=gen) + torch.tensor(EXPERT_BIAS)  # [N, E]
    _, expert_ids = route(logits, TOP_K)  # [N, K]
    capacity = expert_capacity(N_TOKENS, TOP_K, N_EXPERTS, CAPACITY_FACTOR)
    plan = align_slots(expert_ids, N_EXPERTS, BLOCK_M, capacity)
    n_slots = expert_ids.numel()  # S = N * K
    rows = plan.sorted_slots[:int(plan.padded_total)].tolist()  # [P used] slot per row, S = padding
    dropped = sorted(set(range(n_slots)) - set(rows))
    require(len(dropped) == int(plan.dropped) > 0, "the capacity limit drops no slot")
    return dict(expert_ids=expert_ids, capacity=capacity, rows=rows, dropped=dropped,
                block_expert=plan.block_expert.tolist(), n_slots=n_slots)


def slot_expert(expert_ids: torch.Tensor, slot: int) -> int:
    """Expert of slot s = choice * N + token (choice-major, as in kernels/moe_dispatch.py)."""
    n_tokens = expert_ids.shape[0]
    return int(expert_ids[slot % n_tokens, slot // n_tokens])


def draw_expert_dispatch(path: Path) -> Path:
    ex = dispatch_example()
    expert_ids, rows, dropped, n_slots = ex["expert_ids"], ex["rows"], ex["dropped"], ex["n_slots"]
    n_blocks = len(rows) // BLOCK_M
    height = max(N_TOKENS, n_blocks, len(dropped)) * 0.8 + 4.2
    fig, ax = canvas(18.5, height)
    ax.text(0.3, 0.6, f"Expert dispatch: {N_TOKENS} tokens, top-{TOP_K} of {N_EXPERTS} experts, "
            f"capacity_factor {CAPACITY_FACTOR} -> capacity {ex['capacity']} slots per expert",
            fontsize=11, weight="bold", va="center")

    # left: slot s = choice * N + token, in token order
    x0, y0, w, h = 1.9, 2.3, 1.7, 0.8
    ax.text(x0 + TOP_K * w / 2, 1.35, "route(): slots in token order", ha="center", fontsize=9)
    for j in range(TOP_K):
        ax.text(x0 + (j + 0.5) * w, 1.95, ["1st choice", "2nd choice", "3rd choice"][j],
                ha="center", fontsize=8)
    for n in range(N_TOKENS):
        ax.text(x0 - 0.15, y0 + (n + 0.5) * h, f"token {n}", ha="right", va="center", fontsize=8)
        for j in range(TOP_K):
            slot = j * N_TOKENS + n
            e = slot_expert(expert_ids, slot)
            box(ax, x0 + j * w, y0 + n * h, w, h, EXPERT_COLOURS[e], f"s{slot}\nE{e}", size=7,
                crossed=slot in dropped)

    # right: sorted_slots read row by row; one row = one block of BLOCK_M rows = one expert
    rx, rw = 10.0, 1.3
    arrow(ax, (x0 + TOP_K * w + 0.4, y0 + 2.4), (rx - 2.9, y0 + 2.4), lw=1.5)
    ax.text((x0 + TOP_K * w + rx - 2.5) / 2, y0 + 2.0, "align_slots()", ha="center", fontsize=9)
    ax.text(rx + BLOCK_M * rw / 2, 1.35, f"sorted_slots, one run per expert (BLOCK_M = {BLOCK_M})",
            ha="center", fontsize=9)
    for b in range(n_blocks):
        ax.text(rx - 0.15, y0 + (b + 0.5) * h, f"block {b} -> E{ex['block_expert'][b]}",
                ha="right", va="center", fontsize=8)
        for i in range(BLOCK_M):
            slot = rows[b * BLOCK_M + i]
            if slot == n_slots:  # padding up to the block size
                box(ax, rx + i * rw, y0 + b * h, rw, h, "white", "pad", size=7, hatch="///", edge="#999999")
            else:
                box(ax, rx + i * rw, y0 + b * h, rw, h, EXPERT_COLOURS[slot_expert(expert_ids, slot)],
                    f"s{slot}\nt{slot % N_TOKENS}", size=7)

    # dropped: over capacity, after the expert's first `capacity` slots (first choices first)
    dx = rx + BLOCK_M * rw + 1.0
    ax.text(dx + rw / 2, 1.35, "dropped", ha="center", fontsize=9)
    for i, slot in enumerate(dropped):
        box(ax, dx, y0 + i * h, rw, h, EXPERT_COLOURS[slot_expert(expert_ids, slot)],
            f"s{slot}\nt{slot % N_TOKENS}", size=7, crossed=True)

    handles = [Patch(facecolor=EXPERT_COLOURS[e], edgecolor="black", label=f"expert {e}")
               for e in range(N_EXPERTS)]
    handles.append(Patch(facecolor="white", edgecolor="#999999", hatch="///", label="padding"))
    ax.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.text(0.3, height - 1.5, f"slot s = choice x N + token (s{N_TOKENS} is token 0's 2nd choice), so "
            "first choices come first and win the places; t = the token whose row x[t] the kernel "
            "gathers.\nRed X: over capacity (dropped); the token keeps its other slot, or rides the "
            "residual unchanged if it has none.", fontsize=8, color="#333333", va="center")
    return save(fig, path)


# ---------------------------------------------------------------------------------------
# 2. Block table: logical blocks of each sequence -> physical blocks of the pool
# ---------------------------------------------------------------------------------------

NUM_BLOCKS, BLOCK_SIZE = 12, 4
# (operation, sequence, tokens it will hold): seqs 0, 1, 2 hold 12, 5 and 6 tokens; seq 1
# finishes; seq 3 arrives and stores a first prefill chunk of 4; then the scheduler reserves
# room for the step of engine_step.png: one token each for seqs 0 and 2, a chunk of 5 for seq 3.
BLOCK_HISTORY = [("reserve", 0, 12), ("reserve", 1, 5), ("reserve", 2, 6), ("release", 1, 0),
                 ("reserve", 3, 4), ("reserve", 0, 13), ("reserve", 2, 7), ("reserve", 3, 9)]
STEP = dict(seq_ids=[0, 2, 3], query_lens=[1, 1, 5], seq_lens=[13, 7, 9])  # two decodes, one chunk


def tiny_config() -> ModelConfig:
    """As tests/conftest.py's tiny_config: small enough that the pool costs nothing."""
    return ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_expert=24, n_experts=4,
                       experts_per_token=2, max_seq_len=64)


def replay_block_history(blocks: BlockManager, history: list[tuple[str, int, int]]) -> dict:
    """Run `history` on the block manager and snapshot it. The only place that touches
    the block API (reserve, release, tables, free_blocks, num_blocks, block_size)."""
    lengths: dict[int, int] = {}  # tokens each live sequence holds
    released: dict[int, list[int]] = {}  # sequence -> the blocks it gave back
    for op, seq, n_tokens in history:
        if op == "reserve":
            blocks.reserve(seq, n_tokens)
            lengths[seq] = n_tokens
        else:
            released[seq] = list(blocks.tables[seq])
            blocks.release(seq)
            lengths.pop(seq)
    return dict(tables={s: list(t) for s, t in blocks.tables.items()}, lengths=lengths,
                released=released, free=list(blocks.free_blocks), num_blocks=blocks.num_blocks,
                block_size=blocks.block_size)


def paged_example() -> tuple[BlockManager, dict]:
    blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    return blocks, replay_block_history(blocks, BLOCK_HISTORY)


def block_owners(snap: dict) -> dict[int, tuple[int, int]]:
    """Physical block -> (sequence, tokens it holds)."""
    owners = {}
    for seq, table in snap["tables"].items():
        for i, block in enumerate(table):
            owners[block] = (seq, min(snap["block_size"], snap["lengths"][seq] - i * snap["block_size"]))
    return owners


def draw_token_slots(ax, x: float, y: float, w: float, h: float, colour: str, n_full: int,
                     block_size: int) -> None:
    """A block drawn as block_size token slots, the first n_full of them filled."""
    for i in range(block_size):
        box(ax, x + i * w / block_size, y, w / block_size, h, colour if i < n_full else "white",
            edge="#777777", lw=0.5)
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="black", lw=1.0))


def draw_block_table(path: Path) -> Path:
    _, snap = paged_example()
    bs, tables = snap["block_size"], snap["tables"]
    owners = block_owners(snap)
    seqs = sorted(tables)
    pitch, bw, bh, group_gap = 1.45, 1.2, 0.6, 0.8  # block spacing, width, height; between tables
    left = 2.0
    width = left + max(snap["num_blocks"] * pitch,
                       sum(len(t) for t in tables.values()) * pitch + group_gap * (len(seqs) - 1)) + 0.6
    table_y, pool_y = 2.6, 6.6
    fig, ax = canvas(width, pool_y + 3.8)
    ax.text(0.3, 0.6, f"Block tables: {len(seqs)} sequences in a pool of {snap['num_blocks']} blocks "
            f"of {bs} tokens (BlockManager)", fontsize=11, weight="bold", va="center")
    ax.text(0.3, table_y + bh / 2, "tables", va="center", fontsize=9, weight="bold")

    # the tables side by side: logical block i of a sequence -> physical block table[i]
    x = left
    for seq in seqs:
        colour = SEQUENCE_COLOURS[seq % len(SEQUENCE_COLOURS)]
        group_w = len(tables[seq]) * pitch - (pitch - bw)
        ax.text(x + group_w / 2, table_y - 0.85, f"seq {seq}: {snap['lengths'][seq]} tokens",
                ha="center", fontsize=8.5)
        for i, block in enumerate(tables[seq]):
            draw_token_slots(ax, x, table_y, bw, bh, colour, owners[block][1], bs)
            ax.text(x + bw / 2, table_y - 0.2, f"[{i}] = {block}", ha="center", fontsize=7)
            target = left + block * pitch + bw / 2
            arrow(ax, (x + bw / 2, table_y + bh), (target, pool_y - 0.05), colour=colour, lw=1.1)
            x += pitch
        x += group_gap

    ax.text(0.3, pool_y + bh / 2, "pool", va="center", fontsize=9, weight="bold")
    for block in range(snap["num_blocks"]):
        x = left + block * pitch
        if block in owners:
            seq, n_full = owners[block]
            draw_token_slots(ax, x, pool_y, bw, bh, SEQUENCE_COLOURS[seq % len(SEQUENCE_COLOURS)], n_full, bs)
        else:
            box(ax, x, pool_y, bw, bh, FREE, "free", size=7, edge="#999999")
        ax.text(x + bw / 2, pool_y + bh + 0.3, f"block {block}", ha="center", fontsize=7)

    calls = " ".join(f"{op}({seq}, {n})" if op == "reserve" else f"{op}({seq})"
                     for op, seq, n in BLOCK_HISTORY)
    notes = [f"calls, in order: {calls}",
             f"free_blocks = {snap['free']}  (reserve() pops from the right end)"]
    for seq, blocks in snap["released"].items():
        reused = sorted((b, owners[b][0]) for b in blocks if b in owners)
        notes.append(f"seq {seq} was released: its blocks {blocks} went back to the free list; "
                     + ", ".join(f"block {b} now belongs to seq {s}" for b, s in reused))
    notes.append("a table grows one block at a time as its sequence grows, so its blocks need "
                 "not be contiguous or in order in the pool")
    for i, note in enumerate(notes):
        ax.text(0.3, pool_y + 1.7 + i * 0.5, note, fontsize=8, color="#333333")
    return save(fig, path)


# ---------------------------------------------------------------------------------------
# 3. Engine step: one ragged row of tokens, query_start, positions, slot_mapping
# ---------------------------------------------------------------------------------------

def step_layout() -> tuple[dict, dict]:
    """The block tables above, then `set_layout` for one mixed step; what it recorded, as
    lists. The one place that reads the step's layout (cache.layout, a PagedLayout, and
    cache.slot_mapping): adapt it if they move."""
    blocks, snap = paged_example()
    cache = PagedKVCache(tiny_config(), NUM_BLOCKS, BLOCK_SIZE)
    cache.set_layout(blocks, STEP["seq_ids"], STEP["query_lens"], STEP["seq_lens"])
    layout = dict(query_start=cache.layout.query_start.tolist(),  # [B + 1]
                  seq_lens=cache.layout.seq_lens.tolist(),  # [B]
                  block_tables=cache.layout.block_tables.tolist(),  # [B, MB]
                  slot_mapping=cache.slot_mapping.tolist())  # [N]
    return layout, snap


def draw_engine_step(path: Path) -> Path:
    layout, snap = step_layout()
    bs, seq_ids = snap["block_size"], STEP["seq_ids"]
    starts, seq_lens, slots = layout["query_start"], layout["seq_lens"], layout["slot_mapping"]
    n_tokens = starts[-1]
    sw, gap = 0.42, 0.22  # pool slot width, gap between blocks
    pool_w = snap["num_blocks"] * (bs * sw + gap)
    width = pool_w + 2.2
    fig, ax = canvas(width, 14.2)
    ax.text(0.3, 0.6, f"One engine step: {n_tokens} new tokens of {len(seq_ids)} sequences as one "
            "ragged row (PagedKVCache.set_layout)", fontsize=11, weight="bold", va="center")

    # the ragged row: token i of the step belongs to sequence b with starts[b] <= i < starts[b+1]
    tw, th = 1.5, 0.9
    row_x, row_y = (width - n_tokens * tw) / 2, 3.0
    positions = []
    for b, seq in enumerate(seq_ids):
        colour = SEQUENCE_COLOURS[seq % len(SEQUENCE_COLOURS)]
        n_new = starts[b + 1] - starts[b]
        kind = "decode" if n_new == 1 else f"prefill chunk of {n_new}"
        mid = row_x + (starts[b] + n_new / 2) * tw
        ax.text(mid, row_y - 0.75, f"seq {seq}\n{kind}", ha="center", fontsize=8)
        for i in range(starts[b], starts[b + 1]):
            pos = seq_lens[b] - n_new + (i - starts[b])  # new tokens are the last ones stored
            positions.append(pos)
            box(ax, row_x + i * tw, row_y, tw, th, colour, f"pos {pos}\nslot {slots[i]}", size=7.5)
    for b, start in enumerate(starts):
        x = row_x + start * tw
        ax.plot([x, x], [row_y - 0.2, row_y + th + 0.3], color="black", lw=1.6)
        ax.text(x, row_y + th + 0.55, f"{start}", ha="center", fontsize=8)
    ax.text(row_x - 0.2, row_y + th / 2, "tokens [1, N]", ha="right", va="center", fontsize=8)
    ax.text(row_x - 0.2, row_y + th + 0.55, "query_start", ha="right", va="center", fontsize=8)

    # the pool: slot = block * block_size + offset; light = K/V already cached, dark = written now
    pool_y = 8.0
    ax.text(1.0, pool_y - 1.0, "KV pool, slot = block x block_size + position % block_size",
            fontsize=8.5)
    written = {slot: seq_ids[b] for b in range(len(seq_ids)) for slot in slots[starts[b]:starts[b + 1]]}
    cached = {}
    for b, seq in enumerate(seq_ids):
        table = layout["block_tables"][b]
        for pos in range(seq_lens[b]):
            cached[table[pos // bs] * bs + pos % bs] = seq

    def slot_x(slot: int) -> float:
        return 1.0 + (slot // bs) * (bs * sw + gap) + (slot % bs) * sw

    for slot in range(snap["num_blocks"] * bs):
        x = slot_x(slot)
        if slot in written:
            box(ax, x, pool_y, sw, 0.7, SEQUENCE_COLOURS[written[slot] % len(SEQUENCE_COLOURS)], lw=0.5)
        elif slot in cached:
            box(ax, x, pool_y, sw, 0.7, SEQUENCE_COLOURS[cached[slot] % len(SEQUENCE_COLOURS)],
                hatch="....", edge="#777777", lw=0.5)
        else:
            box(ax, x, pool_y, sw, 0.7, "white", edge="#bbbbbb", lw=0.5)
        if slot % bs == 0:
            ax.text(x + bs * sw / 2, pool_y + 1.05, f"block {slot // bs}", ha="center", fontsize=6.5)
    for i, slot in enumerate(slots):
        arrow(ax, (row_x + (i + 0.5) * tw, row_y + th + 0.05), (slot_x(slot) + sw / 2, pool_y - 0.05),
              lw=0.8)

    handles = [Patch(facecolor=SEQUENCE_COLOURS[0], edgecolor="black",
                     label="K/V written this step (slot_mapping)"),
               Patch(facecolor=SEQUENCE_COLOURS[0], edgecolor="#777777", hatch="....",
                     label="K/V cached earlier, read by attention"),
               Patch(facecolor="white", edgecolor="#bbbbbb", label="other sequences' or free")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 9.6 / 14.2), ncol=3,
              fontsize=8, frameon=False)

    lines = [f"cache.set_layout(seq_ids={seq_ids}, query_lens={STEP['query_lens']}, "
             f"seq_lens={STEP['seq_lens']}) records:",
             f"    query_start  = {starts}",
             f"    seq_lens     = {seq_lens}",
             f"    block_tables = {layout['block_tables']}   (short tables padded with block 0; "
             "seq_lens masks it)",
             f"    slot_mapping = {slots}",
             f"position of each token = seq_lens[b] - query_len[b] + index in its chunk = {positions}"]
    for i, line in enumerate(lines):
        ax.text(1.0, 11.0 + i * 0.48, line, fontsize=8, family="monospace", color="#222222")
    return save(fig, path)


# ---------------------------------------------------------------------------------------
# 4. A speculative round: γ proposals, accepted / rejected, the resampled or bonus token
# ---------------------------------------------------------------------------------------

VOCAB, GAMMA = "abcdefgh", 4


def speculative_case(seed: int) -> dict:
    """Draft distributions q [γ, V] with the draft's draws x_i from them, target
    distributions p [γ + 1, V] near q (a draft that mostly agrees), the target's own draws
    y_i with the same noise (`sample_at`, the request seeded `seed`), and what `accept` keeps."""
    gen = torch.Generator().manual_seed(seed)
    n_vocab = len(VOCAB)
    draft_logits = 1.5 * torch.randn(GAMMA, n_vocab, generator=gen)  # [γ, V]
    q = draft_logits.softmax(-1)
    proposals = [sample_at(q[i], seed, i) for i in range(GAMMA)]  # x_1..x_γ
    target_logits = torch.cat([draft_logits, 1.5 * torch.randn(1, n_vocab, generator=gen)])
    p = (target_logits + 1.0 * torch.randn(GAMMA + 1, n_vocab, generator=gen)).softmax(-1)  # [γ + 1, V]
    draws = [sample_at(p[i], seed, i) for i in range(GAMMA + 1)]  # the target's own draws
    kept, n_accepted = accept(proposals, draws)
    return dict(q=q, p=p, proposals=proposals, kept=kept, n_accepted=n_accepted, seed=seed, draws=draws)


def find_case(wanted) -> dict:
    """The first seed whose round `wanted(n_accepted)` holds (deterministic)."""
    for seed in range(200):
        case = speculative_case(seed)
        if wanted(case["n_accepted"]):
            return case
    raise RuntimeError("draw_figures: no seed below 200 gives the wanted speculative round")


def outcome_colours(case: dict) -> tuple[list[str], list[str]]:
    """Colours of the γ proposals and of the kept tokens."""
    n_ok = case["n_accepted"]
    proposed = [ACCEPTED if i < n_ok else REJECTED if i == n_ok else UNCHECKED for i in range(GAMMA)]
    last = BONUS if n_ok == GAMMA else RESAMPLED
    return proposed, [ACCEPTED] * n_ok + [last]


def draw_round_strip(ax, case: dict, y: float, label: str) -> None:
    proposed, kept = outcome_colours(case)
    ax.text(0.2, y + 0.35, label, fontsize=9, weight="bold", va="center")
    ax.text(3.2, y + 1.15, "draft proposes", ha="right", va="center", fontsize=8)
    ax.text(3.2, y + 2.35, "kept", ha="right", va="center", fontsize=8)
    for i, token in enumerate(case["proposals"]):
        box(ax, 3.5 + i * 1.3, y + 0.8, 1.1, 0.7, proposed[i], f"x{i + 1} = {VOCAB[token]}", size=8,
            crossed=proposed[i] == REJECTED)
    for i, token in enumerate(case["kept"]):
        box(ax, 3.5 + i * 1.3, y + 2.0, 1.1, 0.7, kept[i], VOCAB[token], size=9)
    n_ok = case["n_accepted"]
    if n_ok < GAMMA:
        what = (f"{n_ok} accepted; x{n_ok + 1} is not the target's draw y{n_ok + 1} and is replaced "
                "by it;\nlater proposals never checked")
    else:
        what = f"all {GAMMA} accepted, plus the target's draw y{GAMMA + 1} as a bonus"
    ax.text(3.5 + (GAMMA + 1) * 1.3 + 0.3, y + 2.35, f"{what}\n-> {len(case['kept'])} tokens from "
            "one target forward", va="center", fontsize=8)


def draw_speculative_round(path: Path) -> Path:
    rejected = find_case(lambda n: 1 <= n < GAMMA - 1)  # some accepted, one rejected
    bonus = find_case(lambda n: n == GAMMA)
    fig = plt.figure(figsize=(12, 7.4))
    fig.suptitle(f"A speculative round (moe.serving.speculative.accept), gamma = {GAMMA}, "
                 f"toy vocabulary '{VOCAB}'", fontsize=12, weight="bold", y=0.985)
    grid = fig.add_gridspec(2, GAMMA + 1, height_ratios=[1.0, 1.2], left=0.05, right=0.98,
                            top=0.85, bottom=0.02, hspace=0.22, wspace=0.25)
    fig.text(0.05, 0.91, "Round A: draft q (grey) and target p (black outline) at each position; with the "
             "same noise the draft draws x_i and the target y_i; x_i is accepted while x_i = y_i", fontsize=9)
    n_ok = rejected["n_accepted"]
    proposed, _ = outcome_colours(rejected)
    xs = list(range(len(VOCAB)))
    for i in range(GAMMA + 1):
        ax = fig.add_subplot(grid[0, i])
        p = rejected["p"][i].tolist()  # [V]
        if i < GAMMA:
            q, token = rejected["q"][i].tolist(), rejected["proposals"][i]
            colours = ["#bbbbbb"] * len(VOCAB)
            colours[token] = proposed[i]
            ax.bar(xs, q, width=0.8, color=colours)
            draw = rejected["draws"][i]
            verdict = {ACCEPTED: "accepted", REJECTED: "rejected", UNCHECKED: "not checked"}[proposed[i]]
            ax.set_title(f"x{i + 1} = {VOCAB[token]}, y{i + 1} = {VOCAB[draw]}\n{verdict}", fontsize=8.5,
                         color="black" if proposed[i] == UNCHECKED else proposed[i])
        else:
            ax.set_title(f"p{GAMMA + 1}: bonus position\n(used only if all pass)", fontsize=8.5)
        ax.bar(xs, p, width=0.8, fill=False, edgecolor="black", lw=1.0)
        if i == n_ok:  # the rejected position: the target's own draw, kept
            resampled = rejected["kept"][-1]
            ax.plot([resampled], [max(p[resampled], float(rejected["q"][i][resampled])) + 0.05], marker="*",
                    color=RESAMPLED, markersize=12, markeredgecolor="black")
        ax.set_xticks(xs, list(VOCAB), fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="y", labelsize=7)
    strip = fig.add_subplot(grid[1, :])
    strip.set_xlim(0, 24)
    strip.set_ylim(7.0, -0.2)
    strip.axis("off")
    draw_round_strip(strip, rejected, 0.0, "Round A")
    draw_round_strip(strip, bonus, 3.6, "Round B")
    handles = [Patch(facecolor=c, edgecolor="black", label=name) for c, name in
               ((ACCEPTED, "accepted"), (REJECTED, "rejected"), (RESAMPLED, "the target's draw (star above)"),
                (BONUS, "bonus"), (UNCHECKED, "not checked"))]
    strip.legend(handles=handles, loc="lower right", fontsize=8, frameon=False, ncol=5,
                 bbox_to_anchor=(1.0, -0.02))
    return save(fig, path)


# ---------------------------------------------------------------------------------------
# 5. Expert parallelism: rows each rank sends to each rank, dispatch and combine
# ---------------------------------------------------------------------------------------

EP_RANKS, EP_EXPERTS, EP_TOKENS, EP_K, EP_D = 4, 8, 8, 2, 16


def expert_parallel_counts(seed: int = 0) -> dict:
    """Per rank: route its own N tokens with the replicated router, count slots per expert and
    group them by owning rank, as ExpertParallelMoE.run_experts does (dropless); then the count
    exchange: what each rank receives from each source."""
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn(EP_EXPERTS, EP_D, generator=gen)  # [E, D], the same on every rank
    n_local = EP_EXPERTS // EP_RANKS  # L
    send_counts = []  # per source rank: [P, L], row d = its slots for the experts of rank d
    for _ in range(EP_RANKS):
        x = torch.randn(EP_TOKENS, EP_D, generator=gen)  # this rank's tokens [N, D]
        _, expert_ids = route(x @ router.t(), EP_K)  # [N, K]
        slot_expert = expert_ids.t().reshape(-1)  # [S] choice-major
        send_counts.append(expert_counts(slot_expert, EP_EXPERTS).view(EP_RANKS, n_local))
    recv_counts = [torch.stack([send_counts[src][dst] for src in range(EP_RANKS)])  # [P, L] by source
                   for dst in range(EP_RANKS)]
    dispatch = [[int(send_counts[src][dst].sum()) for dst in range(EP_RANKS)] for src in range(EP_RANKS)]
    combine = [[int(recv_counts[src][dst].sum()) for dst in range(EP_RANKS)] for src in range(EP_RANKS)]
    require(combine == [list(r) for r in zip(*dispatch)], "the combine is not the dispatch reversed")
    return dict(send_counts=send_counts, dispatch=dispatch, combine=combine, n_local=n_local)


def draw_count_matrix(ax, matrix: list[list[int]], detail, title: str, rows: str, cols: str) -> None:
    """A P x P matrix of row counts: cell (src, dst), with row and column sums outside."""
    n = len(matrix)
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(max(r) for r in matrix) * 1.6)
    for s in range(n):
        for d in range(n):
            ax.text(d, s - 0.12, f"{matrix[s][d]}", ha="center", va="center", fontsize=11, weight="bold")
            ax.text(d, s + 0.2, detail(s, d), ha="center", va="center", fontsize=7)
        ax.text(n - 0.35, s, f"sends {sum(matrix[s])}", va="center", fontsize=8)
    for d in range(n):
        ax.text(d, n - 0.3, f"gets {sum(r[d] for r in matrix)}", ha="center", va="top", fontsize=8)
        ax.add_patch(Rectangle((d - 0.47, d - 0.47), 0.94, 0.94, fill=False, edgecolor="#444444",
                               lw=1.5, ls=(0, (4, 2))))
    ax.set_xticks(range(n), [f"rank {d}" for d in range(n)], fontsize=8)
    ax.set_yticks(range(n), [f"rank {s}" for s in range(n)], fontsize=8)
    ax.set_xlabel(cols, fontsize=9)
    ax.set_ylabel(rows, fontsize=9)
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=10, pad=28)


def draw_expert_parallel(path: Path) -> Path:
    ex = expert_parallel_counts()
    n_local, send = ex["n_local"], ex["send_counts"]

    def per_expert(src: int, dst: int) -> str:
        counts = send[src][dst].tolist()
        return " ".join(f"E{dst * n_local + j}:{c}" for j, c in enumerate(counts))

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8))
    fig.subplots_adjust(left=0.08, right=0.93, top=0.76, bottom=0.13, wspace=0.45)
    fig.suptitle(f"Expert parallelism: {EP_RANKS} ranks, {EP_EXPERTS} experts ({n_local} per rank), "
                 f"{EP_TOKENS} tokens per rank, top-{EP_K}", fontsize=12, weight="bold")
    draw_count_matrix(axes[0], ex["dispatch"], per_expert, "dispatch: token rows to the experts' ranks",
                      "token's rank (sends)", "expert's rank (receives)")
    draw_count_matrix(axes[1], ex["combine"], lambda s, d: per_expert(d, s),
                      "combine: expert outputs back (the splits reversed)",
                      "expert's rank (sends)", "token's rank (receives)")
    fig.text(0.08, 0.03, "Counts from route() on each rank's tokens, counted per expert and grouped by "
             "owning rank (counts.view(P, L) in ExpertParallelMoE.run_experts), then exchanged.\n"
             f"Each rank sends N x K = {EP_TOKENS * EP_K} rows (dropless) and gets back as many; dashed "
             "diagonal: rows that stay on their own rank (all_to_all copies them locally).",
             fontsize=8, color="#333333")
    return save(fig, path)


# ---------------------------------------------------------------------------------------

FIGURES = {
    "expert_dispatch.png": draw_expert_dispatch,
    "block_table.png": draw_block_table,
    "engine_step.png": draw_engine_step,
    "speculative_round.png": draw_speculative_round,
    "expert_parallel.png": draw_expert_parallel,
}


def draw_all(out: Path) -> list[Path]:
    """Draw every figure into `out`; the paths written."""
    return [draw(Path(out) / name) for name, draw in FIGURES.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="folder for the PNGs")
    args = parser.parse_args(argv)
    for path in draw_all(args.out):
        print(path)


if __name__ == "__main__":
    main()
