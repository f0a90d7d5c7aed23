"""Stage prepare: the configured data source → data/{train,validation,test}.parquet + data.json."""

from pathlib import Path

from kava.cli import json_arg, run_stage, stage_parser
from kava.data import PREPARED, prepare, write_split
from kava.io import write_json


def main(args):
    # Both splits are read and checked before anything is written: a bad test row must not
    # leave a fresh train.parquet behind.
    tables, info = prepare(args.data, env_path=args.env_data_path or None)
    for split in PREPARED:
        write_split(tables[split], Path(args.out_dir) / f"{split}.parquet")
    write_json(Path(args.out_dir) / "data.json", info)
    for split in PREPARED:
        print(f"{split}: {info['splits'][split]['rows']} rows from {info['source']}, "
              f"skipped {info['splits'][split]['skipped'] or 'none'}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=json_arg, required=True,
                        help="the data config section as JSON")
    parser.add_argument("--env-data-path", default="", help="$KAVA_DATA_PATH, for source auto")
    parser.add_argument("--out-dir", required=True)
    run_stage(main, parser)
