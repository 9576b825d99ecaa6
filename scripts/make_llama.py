"""Writes a random-weight Llama in HuggingFace layout (config.json, model.safetensors,
tokenizer.json), seeded, with numpy only: no download, no torch.

Usage: python3 scripts/make_llama.py OUT_DIR [--preset 1b|small|tiny] [--dtype bf16|f16|f32] [--seed N]

Weights are normal(0, 0.02) like HuggingFace's initialiser, norms are 1. The tokenizer is a
word-level one: `<unk>`, `<s>`, `</s>`, then `w3` .. `w{vocab-1}`, split on whitespace, so a prompt
of n words `w10 w11 ...` is exactly n tokens.
"""

import argparse
import json
import os
import struct

import numpy as np

PRESETS = {
    # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
    "1b": (2048, 22, 32, 4, 5632, 32000, False),
    "small": (576, 30, 9, 3, 1536, 49152, True),
    "tiny": (64, 2, 4, 2, 128, 512, False),
}
DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def layout(preset):
    """Every tensor as (name, shape, init), in file order; init is "normal" or "ones"."""
    hidden, layers, heads, kv_heads, inter, vocab, tied = PRESETS[preset]
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", [vocab, hidden], "normal")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [hidden], "ones"),
            (p + "self_attn.q_proj.weight", [heads * head_dim, hidden], "normal"),
            (p + "self_attn.k_proj.weight", [kv_heads * head_dim, hidden], "normal"),
            (p + "self_attn.v_proj.weight", [kv_heads * head_dim, hidden], "normal"),
            (p + "self_attn.o_proj.weight", [hidden, heads * head_dim], "normal"),
            (p + "post_attention_layernorm.weight", [hidden], "ones"),
            (p + "mlp.gate_proj.weight", [inter, hidden], "normal"),
            (p + "mlp.up_proj.weight", [inter, hidden], "normal"),
            (p + "mlp.down_proj.weight", [hidden, inter], "normal"),
        ]
    out.append(("model.norm.weight", [hidden], "ones"))
    if not tied:
        out.append(("lm_head.weight", [vocab, hidden], "normal"))
    return out


def encode(array, dtype):
    if dtype == "f32":
        return array.astype("<f4").tobytes()
    if dtype == "f16":
        return array.astype("<f2").tobytes()
    # bf16: round the f32 bits to nearest even, keep the high half.
    bits = array.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def write_weights(path, preset, dtype, seed):
    """Writes model.safetensors; returns the bytes of tensor data."""
    rng = np.random.default_rng(seed)
    size = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in layout(preset):
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, shape, init in layout(preset):
            if init == "ones":
                array = np.ones(shape, dtype=np.float32)
            else:
                array = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            out.write(encode(array, dtype))
    return offset


def write_config(path, preset, dtype):
    hidden, layers, heads, kv_heads, inter, vocab, tied = PRESETS[preset]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
    }
    with open(path, "w") as out:
        json.dump(config, out, indent=1)


def write_tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write_config(os.path.join(args.out, "config.json"), args.preset, args.dtype)
    write_tokenizer(os.path.join(args.out, "tokenizer.json"), PRESETS[args.preset][5])
    n = write_weights(os.path.join(args.out, "model.safetensors"), args.preset, args.dtype, args.seed)
    print(json.dumps({"dir": args.out, "preset": args.preset, "dtype": args.dtype, "weight_bytes": n}))


if __name__ == "__main__":
    main()
