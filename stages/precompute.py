"""Stage precompute: one teacher x split x shard → a KV shard on scratch + its JSON sidecar."""

from kava.cli import add_prompt_format_argument, json_arg, run_stage, stage_parser
from kava.config import schema_enum
from kava.data import read_split
from kava.io import atomic_path, read_json, remove_stale_temps, write_json
from kava.layer_maps import layers_to_store
from kava.kvstore import logits_spec
from kava.precompute import load_basis, load_teacher, precompute_shard
from kava.prompts import render_rows


def stored_layers(args, cfg, teacher):
    """The teacher layers precompute.layers asks for (shared with stage kv_basis)."""
    student_card = read_json(args.student_card) if args.student_card else None
    return layers_to_store(cfg["layers"], read_json(args.teacher_dims)["num_layers"], student_card,
                         teacher, args.arms)


def add_layer_arguments(parser):
    parser.add_argument("--teacher-dims", required=True)
    parser.add_argument("--student-card", help="for precompute.layers: mapped")
    parser.add_argument("--arms", type=json_arg, default=None,
                        help="for precompute.layers: mapped, {arm: {layer_map, explicit_layer_map}}")


def main(args):
    cfg, card = args.precompute, read_json(args.card)
    per_shard = cfg["examples_per_shard"]
    rows = read_split(args.data, ("id", "question", "answer"), args.shard * per_shard,
                      (args.shard + 1) * per_shard)
    layers = stored_layers(args, cfg, card["name"])
    model, tokenizer, identity = load_teacher(card, cfg["compute_dtype"])
    rows = render_rows(rows, tokenizer, args.prompt_format, card["name"])
    basis = None
    if cfg["dtype"] == "pca":
        basis = load_basis(args.basis, identity=identity, layers=layers, key_space=cfg["key_space"],
                           kv_shape=read_json(args.teacher_dims)["layers"][layers[0]]["k_shape"])
    logits = None
    if args.logits:
        logits = logits_spec(cfg["logits_k"], cfg["logits_dtype"], model.config.vocab_size)
    # A kill -9 skips atomic_path's cleanup; Snakemake never runs two jobs for one shard.
    remove_stale_temps(args.shard_out)
    with atomic_path(args.shard_out) as tmp:
        record = precompute_shard(
            model, tokenizer, rows, tmp, identity=identity, layers=layers,
            key_space=cfg["key_space"], dtype=cfg["dtype"], max_length=args.max_length,
            on_too_long=args.on_too_long, batch_tokens=cfg["batch_tokens"], basis=basis,
            logits=logits,
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
    parser.add_argument("--on-too-long", choices=schema_enum("on_too_long"), required=True)
    add_prompt_format_argument(parser)
    add_layer_arguments(parser)
    parser.add_argument("--basis", help="the teacher's basis file (precompute.dtype: pca)")
    parser.add_argument("--logits", action="store_true",
                        help="store the top-k logits too (a teacher whose logits an arm distils)")
    parser.add_argument("--shard-out", required=True)
    parser.add_argument("--info", required=True, help="the shard's JSON sidecar")
    run_stage(main, parser)
