"""Stage dims: one real forward of a model → what its KV cache really looks like (JSON)."""

from kava.cli import run_stage, stage_parser
from kava.dims import detect_dims
from kava.environment import job_device
from kava.io import read_json, write_json
from kava.models import load_model, load_tokenizer


def main(args):
    card = read_json(args.card)
    model = load_model(card, device=job_device())
    dims = detect_dims(model, load_tokenizer(card["dir"]), card["name"])
    write_json(args.out, dims)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--card", required=True)
    parser.add_argument("--out", required=True)
    run_stage(main, parser)
