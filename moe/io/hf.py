"""Hugging Face interop: load and save checkpoints in the Mixtral layout.

Why: real open MoE checkpoints are published as Hugging Face Mixtral folders, and what is
trained here should be publishable the same way. The two models compute the same thing,
so the mapping is a renaming plus a re-stacking of the experts, nothing approximate:

| here                               | Mixtral (Hugging Face)                                 |
| ---------------------------------- | ------------------------------------------------------ |
| embed.weight [V, D]                | model.embed_tokens.weight                              |
| blocks.L.attention_norm.weight     | model.layers.L.input_layernorm.weight                  |
| blocks.L.attention.wq/wk/wv/wo     | model.layers.L.self_attn.q_proj/k_proj/v_proj/o_proj   |
| blocks.L.ffn_norm.weight           | model.layers.L.post_attention_layernorm.weight         |
| blocks.L.ffn.router.weight [E, D]  | model.layers.L.block_sparse_moe.gate.weight [E, D]     |
| blocks.L.ffn.w_in[e] [D, 2F]       | [w1.weight.T | w3.weight.T] of experts.e (gate | up)   |
| blocks.L.ffn.w_out[e] [F, D]       | experts.e.w2.weight.T (down, stored [D, F])            |
| norm.weight, lm_head.weight        | model.norm.weight, lm_head.weight                      |

- RoPE: both use the "rotate half" pairing (channel i with i + Dh/2) on the rows of
  q_proj and k_proj as stored, so attention weights load without a permutation.
- RMSNorm: both compute x * rsqrt(mean(x^2) + eps) in float32, then scale by the weight.
- Router: Mixtral takes softmax over all E logits, keeps the top K and renormalises them
  to sum to 1 -- exactly ours for K > 1 (for K = 1 ours keeps the raw probability, so a
  Mixtral with num_experts_per_tok = 1 would differ by a per-token scale; it is refused).
- Aux loss: Mixtral's load-balancing loss is K times ours (it sums the per-choice
  fractions), so router_aux_loss_coef = aux_loss_coef / K. That is exact per layer only:
  transformers pools the router logits of all layers into one loss, ours averages the
  per-layer losses, so with several layers the two totals differ (the coefficient maps,
  the value does not). Mixtral has no z-loss and no capacity limit: an import sets
  z_loss_coef = 0 and stays dropless.

What cannot map is refused with the key or tensor named: another model_type, attention
over a sliding window shorter than the context, RoPE scaling, quantised weights, missing
tensors; on export, dense layers (moe_every != 1 has no Mixtral form).

Loading is lazy: every file is memory-mapped (safetensors), each tensor is read once and
copied into its final place, so a model larger than half the RAM still loads.
A folder's tokenizer.json is read by moe/serving/text.py.

Shapes: V vocab, D d_model, E experts, K experts per token, F expert hidden width.
"""

from __future__ import annotations

import json
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe import tokenizer as byte_tokenizer
from moe.io.files import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, write_directory_atomically
from moe.config import BYTE_VOCAB_SIZE, ModelConfig
from moe.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old exports stored; recomputed here
STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}  # safetensors dtype names


def is_hf_folder(path: str | Path) -> bool:
    """True when `path/config.json` is a Hugging Face config (it names a model_type)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        return "model_type" in json.loads(file.read_text())
    except json.JSONDecodeError:
        return False


# ---------------------------------------------------------------------------------------
# Config: Mixtral's config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------

def model_config_from_hf(hf: dict, where: str = CONFIG_FILE) -> ModelConfig:
    """Our config for a Mixtral config.json, refusing anything that would change the math."""
    def refuse(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key} = {hf.get(key)!r} {why}")

    if hf.get("model_type") != "mixtral":
        raise refuse("model_type", "is not \"mixtral\"; only Mixtral-format checkpoints "
                     "(MixtralForCausalLM) map onto this model")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_local_experts", "num_experts_per_tok"):
        if not isinstance(hf.get(key), int):
            raise refuse(key, "is missing or not an integer; a Mixtral config needs it")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "is not \"silu\": our experts are SwiGLU (silu gate) only")
    if hf["num_experts_per_tok"] < 2:
        raise refuse("num_experts_per_tok", "is below 2: Mixtral renormalises the top-k weights "
                     "(a single weight becomes 1.0), ours keeps the raw probability for K = 1")
    max_len = hf.get("max_position_embeddings", 4096 * 32)
    window = hf.get("sliding_window")
    if window is not None and window < max_len:
        raise refuse("sliding_window", f"is shorter than max_position_embeddings = {max_len}: "
                     "sliding-window attention is not implemented here; set it to null only "
                     "if the model was trained with full attention")
    if hf.get("rope_scaling"):
        raise refuse("rope_scaling", "is set: scaled RoPE variants are not implemented here")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":  # "type": the legacy key
        raise refuse("rope_parameters", "uses a scaled RoPE type: only \"default\" maps here")
    if hf.get("quantization_config"):
        raise refuse("quantization_config", "is set: quantised weights do not load here; use "
                     "the float16 / bfloat16 / float32 release of the model")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), d_expert=hf["intermediate_size"],
        n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
        moe_every=1, capacity_factor=None,
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) * hf["num_experts_per_tok"],
        z_loss_coef=0.0, router_jitter=float(hf.get("router_jitter_noise", 0.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
        max_seq_len=max_len, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=float(hf.get("attention_dropout", 0.0)),
        init_std=float(hf.get("initializer_range", 0.02)))


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The Mixtral config.json for our config; refuses what Mixtral cannot express."""
    if cfg.moe_layers != list(range(cfg.n_layers)):
        raise CheckpointError(
            f"model.moe_every = {cfg.moe_every} gives dense layers "
            f"{[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]}: every Mixtral layer "
            "is an MoE layer, so this model has no Mixtral form; export needs moe_every = 1")
    if cfg.experts_per_token < 2:
        raise CheckpointError("model.experts_per_token = 1 has no Mixtral form: Mixtral "
                              "renormalises the top-k weights, ours keeps the raw probability")
    variants = {"router_score": (cfg.router_score, "softmax"), "balance": (cfg.balance, "aux_loss"),
                "n_shared_experts": (cfg.n_shared_experts, 0), "routing": (cfg.routing, "token_choice")}
    for key, (value, mixtral) in variants.items():
        if value != mixtral:
            raise CheckpointError(f"model.{key} = {value!r} has no Mixtral form: Mixtral routes each "
                                  f"token to its top-k of a softmax with no bias, no shared experts "
                                  f"(model.{key} = {mixtral!r}); keep this model in our format")
    if cfg.short_conv:
        raise CheckpointError(f"model.short_conv = {cfg.short_conv} has no Mixtral form: a Mixtral "
                              "layer feeds its attention the normed residual alone; keep this model "
                              "in our format")
    if cfg.capacity_factor is not None:
        warnings.warn(f"model.capacity_factor = {cfg.capacity_factor} is not exported: Mixtral "
                      "is dropless, so the exported model never drops tokens", stacklevel=3)
    byte_vocab = cfg.vocab_size == BYTE_VOCAB_SIZE
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_expert, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "sliding_window": None, "attention_dropout": cfg.dropout,
        "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
        "router_aux_loss_coef": cfg.aux_loss_coef / cfg.experts_per_token,
        "router_jitter_noise": cfg.router_jitter, "output_router_logits": False,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": byte_tokenizer.BOS if byte_vocab else None,
        "eos_token_id": byte_tokenizer.EOS if byte_vocab else None,
        "pad_token_id": byte_tokenizer.PAD if byte_vocab else None,
    }


def load_hf_config(path: str | Path) -> ModelConfig:
    file = Path(path) / CONFIG_FILE
    try:
        hf = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {file}: {error}") from None
    return model_config_from_hf(hf, str(file))


# ---------------------------------------------------------------------------------------
# Tensor names and shapes
# ---------------------------------------------------------------------------------------

def renamed_tensors(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> Mixtral name for the tensors that map one to one (all but the experts)."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for layer in range(cfg.n_layers):
        ours, theirs = f"blocks.{layer}.", f"model.layers.{layer}."
        names[ours + "attention_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for our_proj, their_proj in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"),
                                     ("wo", "o_proj")):
            names[ours + f"attention.{our_proj}.weight"] = theirs + f"self_attn.{their_proj}.weight"
        names[ours + "ffn.router.weight"] = theirs + "block_sparse_moe.gate.weight"
    return names


def expert_tensor(layer: int, expert: int, which: str) -> str:
    """Mixtral name of one expert matrix: which = w1 (gate), w3 (up) or w2 (down)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{which}.weight"


def expected_shapes(cfg: ModelConfig, model: Transformer) -> dict[str, tuple[int, ...]]:
    """Every tensor a Mixtral checkpoint of this config holds, with its shape."""
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = {theirs: tuple(params[ours].shape) for ours, theirs in renamed_tensors(cfg).items()}
    for layer in range(cfg.n_layers):
        for expert in range(cfg.n_experts):
            shapes[expert_tensor(layer, expert, "w1")] = (cfg.d_expert, cfg.d_model)  # [F, D]
            shapes[expert_tensor(layer, expert, "w3")] = (cfg.d_expert, cfg.d_model)  # [F, D]
            shapes[expert_tensor(layer, expert, "w2")] = (cfg.d_model, cfg.d_expert)  # [D, F]
    return shapes


# ---------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------

def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it: from model.safetensors.index.json when sharded,
    else every tensor of model.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index} has no readable weight_map ({error!r})") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(f"{path} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}: no "
                              "weights to load (only safetensors checkpoints are read)")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_hf(path: str | Path, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None) -> Transformer:
    """Our model from a Mixtral folder (single file or sharded; any stored dtype, kept
    unless `dtype` is given). Every tensor is checked by name and shape first."""
    path = Path(path)
    cfg = load_hf_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    files = weight_files(path)
    expected = expected_shapes(cfg, model)
    present = {name for name in files if not name.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some exports store the tied head too
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its {CONFIG_FILE}: missing tensors "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                              f"tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for file in set(files.values()):
        if not file.is_file():
            raise CheckpointError(f"{file} is named in {INDEX_FILE} but does not exist")

    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                   for file in set(files.values())}  # memory-mapped, read tensor by tensor

        def read(name: str) -> torch.Tensor:
            shape = tuple(handles[files[name]].get_slice(name).get_shape())
            if shape != expected[name]:
                raise CheckpointError(f"tensor {name} in {files[name]} has shape {shape}, "
                                      f"its {CONFIG_FILE} needs {expected[name]}")
            return handles[files[name]].get_tensor(name)

        stored = handles[files["model.embed_tokens.weight"]].get_slice("model.embed_tokens.weight")
        if dtype is None and stored.get_dtype() not in STORED_DTYPES:
            raise CheckpointError(f"model.embed_tokens.weight is stored as {stored.get_dtype()}: "
                                  f"only {', '.join(STORED_DTYPES)} checkpoints load here")
        dtype = dtype or STORED_DTYPES[stored.get_dtype()]
        state = {ours: read(theirs).to(device, dtype)
                 for ours, theirs in renamed_tensors(cfg).items()}
        d_model, hidden = cfg.d_model, cfg.d_expert
        for layer in range(cfg.n_layers):
            w_in = torch.empty(cfg.n_experts, d_model, 2 * hidden, device=device, dtype=dtype)
            w_out = torch.empty(cfg.n_experts, hidden, d_model, device=device, dtype=dtype)
            for expert in range(cfg.n_experts):
                w_in[expert, :, :hidden] = read(expert_tensor(layer, expert, "w1")).T  # gate
                w_in[expert, :, hidden:] = read(expert_tensor(layer, expert, "w3")).T  # up
                w_out[expert] = read(expert_tensor(layer, expert, "w2")).T  # down
            state[f"blocks.{layer}.ffn.w_in"], state[f"blocks.{layer}.ffn.w_out"] = w_in, w_out
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.hf_origin = path  # save_hf carries its special ids and tokenizer files over
    return model


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

def hf_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """(Mixtral name, view of our weight) in checkpoint order. Views copy nothing: the
    export makes each shard contiguous on its own, so it never holds a second model."""
    cfg, hidden = model.cfg, model.cfg.d_expert
    params = dict(model.named_parameters(remove_duplicate=False))
    out = [(theirs, params[ours].detach()) for ours, theirs in renamed_tensors(cfg).items()]
    for layer in range(cfg.n_layers):
        ffn = model.blocks[layer].ffn
        for expert in range(cfg.n_experts):
            w_in, w_out = ffn.w_in[expert].detach(), ffn.w_out[expert].detach()  # [D, 2F], [F, D]
            out += [(expert_tensor(layer, expert, "w1"), w_in[:, :hidden].T),  # [F, D]
                    (expert_tensor(layer, expert, "w2"), w_out.T),  # [D, F]
                    (expert_tensor(layer, expert, "w3"), w_in[:, hidden:].T)]  # [F, D]
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_hf(model: Transformer, path: str | Path, max_shard_bytes: int | None = None,
            tokenizer: str | Path | None = None) -> Path:
    """Write `model` as a Mixtral folder (config.json + generation_config.json +
    safetensors), atomically; with `max_shard_bytes`, split into
    model-0000i-of-0000n.safetensors plus the index. The special token ids and tokenizer
    files come from `tokenizer` (a Hugging Face folder, or one of our checkpoints), by
    default the folder the model was loaded from, so an imported model exported again still
    stops at its EOS; a model of ours gets our special ids (moe/tokenizer.py) and, when it
    was trained with a learned BPE, its tokenizer.json."""
    config = hf_config_from_model(model.cfg, model.embed.weight.dtype)
    source = Path(tokenizer) if tokenizer is not None else getattr(model, "hf_origin", None)
    if source is not None:
        try:
            origin = json.loads((source / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read the special token ids of {source / CONFIG_FILE}: "
                                  f"{error}") from None
        ours = {"bos_token_id": byte_tokenizer.BOS, "eos_token_id": byte_tokenizer.EOS,
                "pad_token_id": byte_tokenizer.PAD} if "model_type" not in origin else {}
        config.update({key: origin.get(key, ours.get(key)) for key in SPECIAL_IDS})
    generation = {key: config[key] for key in SPECIAL_IDS if config[key] is not None}
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = total = 0
    for name, tensor in hf_tensors(model):
        nbytes = tensor.nelement() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size, total = size + nbytes, total + nbytes
    n = len(shards)
    files = [WEIGHTS_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors"
                                           for i in range(1, n + 1)]

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in TOKENIZER_FILES if source is not None else ():
            if (source / name).is_file():
                (tmp / name).write_bytes((source / name).read_bytes())
        for file, shard in zip(files, shards):
            save_file({name: tensor.to("cpu").contiguous() for name, tensor in shard},
                      str(tmp / file), metadata={"format": "pt"})
        if n > 1:
            weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return write_directory_atomically(path, write)
