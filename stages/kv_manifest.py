"""Stage kv_manifest: a teacher x split's shard sidecars → its manifest.json."""

from kava.cli import run_stage, stage_parser
from kava.io import read_json, write_json
from kava.kvstore import build_manifest


def main(args):
    manifest = build_manifest(read_json(args.card), read_json(args.data_info), args.split,
                              [read_json(path) for path in args.shard_infos], args.out)
    write_json(args.out, manifest)
    print(f"{manifest['teacher']['name']} {args.split}: {manifest['examples']} examples, "
          f"{manifest['tokens']} tokens, {manifest['bytes_per_token']:.0f} bytes/token, "
          f"{manifest['truncated']} truncated, {manifest['skipped']} skipped")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--card", required=True, help="the teacher's card")
    parser.add_argument("--data-info", required=True, help="data/data.json")
    parser.add_argument("--split", required=True)
    parser.add_argument("--shard-infos", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    run_stage(main, parser)
