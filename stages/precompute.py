"""Stage precompute: one teacher x split x shard → a KV shard on scratch + its JSON sidecar."""

import torch

from kava.cli import json_arg, run_stage, stage_parser
from kava.data import read_split
from kava.io import atomic_path, read_json, remove_stale_temps, write_json
from kava.models import load_model, load_tokenizer
from kava.precompute import compute_dtype, precompute_shard, select_layers, tokenizer_identity


def main(args):
    cfg, card = args.precompute, read_json(args.card)
    per_shard = cfg["examples_per_shard"]
    rows = read_split(args.data, ("id", "text"), args.shard * per_shard, (args.shard + 1) * per_shard)
    student_card = read_json(args.student_card) if args.student_card else None
    layers = select_layers(cfg["layers"], read_json(args.teacher_dims)["num_layers"],
                           student_card, card["name"])
    dtype_name, dtype = compute_dtype(cfg["compute_dtype"])
    model = load_model(card, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(card["dir"])
    identity = {"teacher": card["name"], "weights_sha256": card["weights_sha256"],
                "tokenizer": tokenizer_identity(tokenizer, card["dir"]), "compute_dtype": dtype_name}
    # A kill -9 skips atomic_path's cleanup; Snakemake never runs two jobs for one shard.
    remove_stale_temps(args.shard_out)
    with atomic_path(args.shard_out) as tmp:
        record = precompute_shard(
            model, tokenizer, rows, tmp, identity=identity, layers=layers,
            key_space=cfg["key_space"], dtype=cfg["dtype"], max_length=args.max_length,
            on_too_long=args.on_too_long, batch_tokens=cfg["batch_tokens"],
            progress_label=f"{card['name']} {args.split} shard {args.shard}")
    first_row = args.shard * per_shard
    write_json(args.info, {**record, "path": args.shard_out, "split": args.split,
                           "rows": [first_row, first_row + len(rows)]})


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--card", required=True, help="the teacher's card")
    parser.add_argument("--data", required=True, help="data/<split>.parquet")
    parser.add_argument("--split", required=True)
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--precompute", type=json_arg, required=True, help="precompute section")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--on-too-long", choices=("truncate", "skip"), required=True)
    parser.add_argument("--teacher-dims", required=True)
    parser.add_argument("--student-card", help="for precompute.layers: mapped")
    parser.add_argument("--shard-out", required=True)
    parser.add_argument("--info", required=True, help="the shard's JSON sidecar")
    run_stage(main, parser)
