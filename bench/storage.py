"""Stored bytes per token for each dtype against raw fp32 K/V, and fp8's reconstruction error.

For each teacher, the same rows are precomputed (fp32 compute, all layers, pre-RoPE) once per
stored dtype. Per token:
- raw fp32 K/V bytes: 2 x layers x H_kv x head_dim x 4;
- stored K/V bytes: the k.*, v.* tensors plus fp8's k_scale.* / v_scale.*, over all tokens;
- file bytes: the whole shard (adds offsets, input_ids, char_spans and the header).
Ratios are stored K/V bytes / raw fp32 bytes (goals: bf16 <= 0.5, fp8 <= 0.25). fp8's error is
1 - cosine similarity between each dequantised K or V vector (one token, one head) and the
fp32 one, averaged over vectors, layers, K and V (goal <= 1e-3); `max_` keys give the worst.

    python -m bench.storage [--tiny | --card CARD ...] [--examples 8]
"""

import tempfile

import torch
from safetensors import safe_open

from bench.common import bench_rows, emit, machine, parser, teacher_cards
from kava.kvstore import KVStore
from kava.precompute import precompute_split

DTYPES = ("fp32", "bf16", "fp16", "fp8")


def kv_bytes(store):
    """Stored K/V bytes (with fp8 scales) of a store, from its shards' tensors."""
    total = 0
    for shard in store.manifest["shards"]:
        with safe_open(str((store.path.parent / shard["path"]).resolve()), framework="pt") as handle:
            total += sum(handle.get_tensor(name).nbytes for name in handle.keys()
                         if name.split(".")[0] in ("k", "v", "k_scale", "v_scale"))
    return total


def fp8_errors(fp8, exact):
    """1 - cosine per (token, head) vector of K and V: (mean, max) over all of them."""
    errors = []
    for i in range(len(exact)):
        got, want = fp8.example(i), exact.example(i)
        for kind in ("k", "v"):
            for layer in exact.layers:
                errors.append(1 - torch.nn.functional.cosine_similarity(
                    got[kind][layer].double(), want[kind][layer].double(), dim=-1).flatten())
    errors = torch.cat(errors)
    return errors.mean().item(), errors.max().item()


def main():
    cli = parser(__doc__)
    cli.set_defaults(examples=8)  # four fp32-compute passes per teacher: keep each short
    args = cli.parse_args()
    rows, source = bench_rows(args.examples)
    figures = {"bench": "storage", "machine": machine(args.threads), "data": source,
               "examples": len(rows), "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="kava-bench-") as workdir:
        for name, card in teacher_cards(args, workdir).items():
            stores = {dtype: KVStore(precompute_split(
                card, rows, f"{workdir}/{name}-{dtype}", examples_per_shard=len(rows),
                compute="fp32", key_space="pre_rope", dtype=dtype, max_length=256,
                on_too_long="truncate", batch_tokens=2048)) for dtype in DTYPES}
            tokens = stores["fp32"].manifest["tokens"]
            n_heads, head_dim = stores["fp32"].kv_shape
            raw = 2 * card["num_layers"] * n_heads * head_dim * 4
            entry = {"tokens": tokens, "raw_fp32_kv_bytes_per_token": raw}
            for dtype, store in stores.items():
                per_token = kv_bytes(store) / tokens
                entry[f"{dtype}_kv_bytes_per_token"] = round(per_token, 1)
                entry[f"{dtype}_file_bytes_per_token"] = round(store.manifest["bytes"] / tokens, 1)
                entry[f"{dtype}_over_fp32_bytes_ratio"] = round(per_token / raw, 4)
            entry["fp8_cosine_error"], entry["max_fp8_cosine_error"] = fp8_errors(
                stores["fp8"], stores["fp32"])
            figures["teachers"][name] = entry
    for key in ("bf16_over_fp32_bytes_ratio", "fp16_over_fp32_bytes_ratio",
                "fp8_over_fp32_bytes_ratio", "fp8_cosine_error", "max_fp8_cosine_error"):
        figures[key] = max(entry[key] for entry in figures["teachers"].values())
    emit(figures)


if __name__ == "__main__":
    main()
