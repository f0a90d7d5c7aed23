"""Precompute throughput against a bare teacher forward over the same batches.

For each teacher, over the same rows and the same length-sorted batches, alternately:
- forward: the decoder body alone (no lm_head, no capture), under inference_mode;
- precompute: kava.precompute.precompute_shard, i.e. tokenisation, the forward with K/V
  capture, the cast to the stored dtype, the write into the shard and its sha256.
Both count the same real (unpadded) tokens. Model loading is outside both. Goal: the ratio of
precompute to forward tokens/s >= 0.95. `--layers mapped` (the default, as precompute.layers)
stores the layers the default student's auto layer map reads; `all` stores every layer.
Give one --card per invocation to measure a teacher as its precompute job runs it, alone in its
process: a teacher measured after another in the same process came out about 5 % slower.
`--dtype pca` (the default, as precompute.dtype) fits its basis on the same rows first, outside
the timing: that is stage kv_basis's work, once per teacher, not per shard.

    python -m bench.precompute [--tiny | --card CARD ... --student-card CARD] [--examples 32]
                               [--repeats 3] [--layers mapped|all] [--dtype pca]
"""

import tempfile
from pathlib import Path

import torch

from bench.common import bench_rows, emit, machine, parser, student_card, teacher_cards, timed
from kava.environment import compute_dtype
from kava.io import read_json
from kava.layer_maps import layers_to_store
from kava.models import load_model, load_tokenizer
from kava.config import schema_defaults
from kava.precompute import (fit_basis, length_batches, pad_batch, precompute_shard, tokenize,
                             tokenizer_identity)


def bare_forward(model, batches, kept):
    with torch.inference_mode():
        for batch in batches:
            input_ids, valid = pad_batch([kept[index][1] for index in batch])
            model.model(input_ids=input_ids, attention_mask=valid.long(), use_cache=False)


def main():
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--dtype", default="pca", choices=("bf16", "fp16", "fp32", "fp8", "pca"),
                     help="the stored format (default pca, precompute.dtype's default; its basis "
                     "is fitted on the same rows before timing, as stage kv_basis does)")
    cli.add_argument("--pca-variance", type=float, default=schema_defaults("precompute")[
        "pca_variance"])
    cli.add_argument("--layers", default="mapped", choices=("mapped", "all"))
    cli.add_argument("--student-card", help="for --layers mapped (default: the default run's)")
    cli.add_argument("--batch-tokens", type=int, default=2048)
    cli.add_argument("--max-length", type=int, default=256)
    args = cli.parse_args()
    dtype_name, dtype = compute_dtype("auto")
    rows, source = bench_rows(args.examples)
    figures = {"bench": "precompute", "machine": machine(args.threads), "data": source,
               "examples": len(rows), "compute_dtype": dtype_name, "dtype": args.dtype,
               "layers": args.layers, "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="kava-bench-") as workdir:
        student = read_json(args.student_card) if args.student_card else student_card(args, workdir)
        for name, card in teacher_cards(args, workdir).items():
            layers = layers_to_store(args.layers, card["num_layers"], student, name)
            model = load_model(card, dtype=dtype)
            tokenizer = load_tokenizer(card["dir"])
            kept, _, _ = tokenize(tokenizer, rows, args.max_length, "truncate", name)
            batches = length_batches([len(ids) for _, ids, _ in kept], args.batch_tokens)
            tokens = sum(len(ids) for _, ids, _ in kept)
            identity = {"teacher": name, "weights_sha256": card["weights_sha256"],
                        "tokenizer": tokenizer_identity(tokenizer, card["dir"]),
                        "compute_dtype": dtype_name}
            shard = Path(workdir) / f"{name}.safetensors"
            basis = None
            if args.dtype == "pca":
                basis = fit_basis(model, tokenizer, rows, Path(workdir) / f"{name}-basis.safetensors",
                                  identity=identity, layers=layers, key_space="pre_rope",
                                  max_length=args.max_length, batch_tokens=args.batch_tokens,
                                  variance=args.pca_variance)

            def precompute():
                return precompute_shard(
                    model, tokenizer, rows, shard, identity=identity,
                    layers=layers, key_space="pre_rope",
                    dtype=args.dtype, max_length=args.max_length, on_too_long="truncate",
                    batch_tokens=args.batch_tokens, basis=basis, progress_label=name)

            bare_forward(model, batches[-1:], kept)  # warm-up: kernels, allocator
            forward_s, precompute_s = float("inf"), float("inf")
            for _ in range(args.repeats):  # alternate, so load changes hit both alike
                forward_s = min(forward_s, timed(lambda: bare_forward(model, batches, kept))[0])
                precompute_s = min(precompute_s, timed(precompute)[0])
            figures["teachers"][name] = {
                "tokens": tokens, "batches": len(batches), "layers": len(layers),
                "forward_s": round(forward_s, 3), "precompute_s": round(precompute_s, 3),
                "forward_tokens_per_s": round(tokens / forward_s, 1),
                "precompute_tokens_per_s": round(tokens / precompute_s, 1),
                "precompute_over_forward_ratio": round(forward_s / precompute_s, 3),
            }
    figures["precompute_over_forward_ratio"] = min(
        t["precompute_over_forward_ratio"] for t in figures["teachers"].values())
    emit(figures)


if __name__ == "__main__":
    main()
