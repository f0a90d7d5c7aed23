"""What the benchmarks share: which teachers, which rows, the machine, and the one-line result.

Run a benchmark from the repository root as `python -m bench.<name>`. Teachers are, in order:
the cards given with --card; the default run's materialised teachers (results/default/models);
with --tiny, the smoke config's tiny random teachers, built in a temporary folder. Rows come
from where the pipeline's prepare stage takes them (data.source auto): $KAVA_DATA_PATH when set
(e.g. KAVA_DATA_PATH=/work/shared/data/gsm8k), else the hub when reachable, else the synthetic
generator; each benchmark's "data" figure says which.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from kava.config import schema_defaults, used_models
from kava.data import prepare
from kava.environment import detect_device, job_precision, usable_cpus
from kava.io import read_json
from kava.models import materialize
from kava.paths import run_paths

PROJECT = Path(__file__).resolve().parents[1]


def parser(description):
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--card", action="append", default=[], help="a teacher card (repeatable)")
    result.add_argument("--tiny", action="store_true", help="the smoke config's tiny teachers")
    result.add_argument("--examples", type=int, default=32, help="examples per teacher")
    result.add_argument("--threads", type=int, default=usable_cpus())
    return result


def _cards(args, workdir, names_of):
    """{name: card} of the models `names_of(config)` names, from the default run's
    materialised models or, with --tiny, built from the smoke config in `workdir`."""
    torch.set_num_threads(args.threads)
    if not args.tiny:
        config = yaml.safe_load((PROJECT / "config" / "config.yaml").read_text())
        models = Path(run_paths(config["run"], project_root=PROJECT)["models"])
        paths = [models / f"{name}.json" for name in names_of(config)]
        if all(path.is_file() for path in paths):
            return {card["name"]: card for card in map(read_json, paths)}
        raise SystemExit(f"no materialised default models under {models}: run `make run` "
                         f"first, or pass --card or --tiny")
    config = yaml.safe_load((PROJECT / "config" / "smoke.yaml").read_text())
    cards = {}
    for name in used_models(config)[::-1]:  # bases before the models derived from them
        spec = config["models"][name]
        base = cards.get(spec.get("derive", {}).get("base"))
        cards[name] = materialize(name, spec, Path(workdir) / name, base_card=base)
    return {name: cards[name] for name in names_of(config)}


def teacher_cards(args, workdir):
    """{name: card} of the teachers to measure: --card, else see _cards."""
    if args.card:
        torch.set_num_threads(args.threads)
        return {card["name"]: card for card in map(read_json, args.card)}
    return _cards(args, workdir, lambda config: config["teachers"])


def student_card(args, workdir):
    return next(iter(_cards(args, workdir, lambda config: [config["student"]]).values()))


def bench_splits(**sizes):
    """({split: rows}, source) as the prepare stage makes them: kava.data.prepare on the data
    section's defaults with `sizes` (train_size, validation_size, test_size) over them, and
    $KAVA_DATA_PATH as the path, as the Snakefile passes it."""
    tables, info = prepare({**schema_defaults("data"), **sizes},
                           env_path=os.environ.get("KAVA_DATA_PATH"))
    return tables, info["source"]


def bench_rows(n):
    """`n` test rows ({id, text, ...}) and their source (see bench_splits)."""
    tables, source = bench_splits(train_size=1, validation_size=0, test_size=n)
    return tables["test"], source


def machine(threads):
    device = detect_device()
    return {"device": device["name"], "device_type": device["type"],
            "precision": job_precision(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(),
            # Other processes' load: on a shared machine it explains noisy figures.
            "load_average_1min": round(os.getloadavg()[0], 2)}


def timed(function):
    """(seconds, result) of one call. Benchmarks alternate what they compare and keep each
    side's minimum: other processes on a shared machine only ever make a run slower."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def emit(figures):
    """The result: one JSON object, the last line printed."""
    print(json.dumps(figures, sort_keys=True))
