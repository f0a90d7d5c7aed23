"""Stage materialize: one configured model → a local HF folder + its card (JSON)."""

from kava.cli import json_arg, run_stage, stage_parser
from kava.io import read_json, write_json
from kava.models import materialize


def main(args):
    base_card = read_json(args.base_card) if args.base_card else None
    card = materialize(args.name, args.spec, args.model_dir, base_card=base_card)
    write_json(args.card, card)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--spec", type=json_arg, required=True, help="models.<name> as JSON")
    parser.add_argument("--model-dir", required=True, help="where to write a built model")
    parser.add_argument("--base-card", help="card of derive.base")
    parser.add_argument("--card", required=True, help="output card JSON")
    run_stage(main, parser)
