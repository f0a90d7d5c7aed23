"""Stage kv_basis: a teacher's pca basis (precompute.dtype: pca), fitted on the KV of the first
precompute.basis_examples train rows and stored once for all its shards of every split."""

from kava.cli import add_prompt_format_argument, json_arg, run_stage, stage_parser
from kava.data import read_split
from kava.io import atomic_path, read_json
from kava.kvstore import basis_ranks
from kava.precompute import fit_basis, load_teacher
from kava.prompts import render_rows
from stages.precompute import add_layer_arguments, stored_layers


def main(args):
    cfg, card = args.precompute, read_json(args.card)
    rows = read_split(args.data, ("id", "question", "answer"), 0, cfg["basis_examples"])
    layers = stored_layers(args, cfg, card["name"])
    model, tokenizer, identity = load_teacher(card, cfg["compute_dtype"])
    rows = render_rows(rows, tokenizer, args.prompt_format, card["name"])
    with atomic_path(args.out) as tmp:
        basis = fit_basis(model, tokenizer, rows, tmp, identity=identity, layers=layers,
                          key_space=cfg["key_space"], max_length=args.max_length,
                          batch_tokens=cfg["batch_tokens"], variance=cfg["pca_variance"])
    print(f"{card['name']}: basis from {len(rows)} train rows, components per layer and kind "
          f"{basis_ranks(basis['tensors'])}, variance kept {basis['explained']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--card", required=True, help="the teacher's card")
    parser.add_argument("--data", required=True, help="data/train.parquet")
    parser.add_argument("--precompute", type=json_arg, required=True, help="precompute section")
    parser.add_argument("--max-length", type=int, required=True)
    add_prompt_format_argument(parser)
    add_layer_arguments(parser)
    parser.add_argument("--out", required=True)
    run_stage(main, parser)
