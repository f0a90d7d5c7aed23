"""Stage cka_layer_map: the initial student's and each teacher's stored per-layer K on a sample
of train examples → per teacher, the stored layer with the highest linear CKA for each student
layer (JSON: layer_map, teacher_layers, scores). Only runs for an arm with layer_map: cka."""

from kava.cli import add_prompt_format_argument, run_stage, stage_parser
from kava.data import read_split
from kava.environment import job_device
from kava.kvfit import cka_layer_maps
from kava.io import read_json, write_json
from kava.kvstore import open_teacher_store
from kava.models import load_model, load_tokenizer
from kava.prompts import render_rows


def main(args):
    card = read_json(args.student_card)
    student = load_model(card, device=job_device())
    stores = {}
    for teacher_card, manifest in zip(args.teacher_cards, args.manifests, strict=True):
        teacher = read_json(teacher_card)
        stores[teacher["name"]] = open_teacher_store(manifest, teacher["name"],
                                                     teacher["weights_sha256"])
    tokenizer = load_tokenizer(card["dir"])
    rows = render_rows(read_split(args.data, ("id", "question", "answer"), 0, args.examples),
                       tokenizer, args.prompt_format, card["name"])
    maps = cka_layer_maps(student, tokenizer, stores, rows, args.max_length, args.time_alignment)
    write_json(args.out, maps)
    for name, found in maps.items():
        print(f"{name}: {found['layer_map']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--student-card", required=True)
    parser.add_argument("--teacher-cards", nargs="+", required=True)
    parser.add_argument("--manifests", nargs="+", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--examples", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    add_prompt_format_argument(parser)
    parser.add_argument("--time-alignment", required=True)
    parser.add_argument("--out", required=True)
    run_stage(main, parser)
