"""Stage model_card: one arm x seed's trained student, its train.json, the model cards and the
report's summary.json → a publishable folder: the student's files and a README.md model card."""

from kava.cli import add_prompt_format_argument, run_stage, stage_parser
from kava.io import read_json
from kava.model_card import build_card, write_publishable


def main(args):
    student_card = read_json(args.student_card)
    base_card = read_json(args.base_card) if args.base_card else None
    card = build_card(args.arm, args.seed, read_json(args.train_info), student_card, base_card,
                      [read_json(path) for path in args.teacher_cards], read_json(args.summary),
                      args.prompt_format)
    write_publishable(card, args.student, args.out)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--student", required=True, help="the trained student's folder")
    parser.add_argument("--train-info", required=True, help="train.json")
    parser.add_argument("--student-card", required=True)
    parser.add_argument("--base-card", help="the card of the model the student derives from")
    parser.add_argument("--teacher-cards", nargs="+", required=True)
    parser.add_argument("--summary", required=True, help="eval/summary.json")
    parser.add_argument("--out", required=True, help="the publishable folder")
    add_prompt_format_argument(parser)
    run_stage(main, parser)
