"""Committed studies and the README tables rendered from them.

Each study is a folder studies/<name>/ holding the run's eval/summary.json and STUDY.json: the
commit and command it came from, when, the data it read (source, path, row hashes) and, per arm,
the step each seed's weights were chosen at with its validation NLL there (what may choose
between arms or settings; test NLL must not), so that every number the README claims names its
run. README.md carries one marked block per study,

    <!-- study:<name> -->
    ...generated table...
    <!-- /study -->

and tests/test_readme.py fails when a block differs from what its committed files give.

    python -m kava.report.studies --add default --results results/default --command "make run"
    python -m kava.report.studies --readme README.md
"""

import argparse
import datetime
import json
import re
import subprocess
from pathlib import Path

from kava.errors import KavaError
from kava.io import write_json
from kava.report.load import train_facts
from kava.report.render import data_source, p_text
from kava.report.summary import spread_over_seeds

STUDIES = Path(__file__).resolve().parents[2] / "studies"
BLOCK = re.compile(r"(<!-- study:([\w.-]+) -->\n)(.*?)(<!-- /study -->)", re.S)


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise KavaError(f"study file {path}: unreadable ({type(err).__name__})") from None


def _validation(results):
    """{arm: {"steps": [chosen step per seed], "nll": [validation NLL there per seed]}} from
    the run's train/<arm>/seed<k>/train.json files; {} when no run chose its weights."""
    infos = {}
    for path in sorted(Path(results).glob("train/*/seed*/train.json")):
        infos.setdefault(path.parent.parent.name, {})[path.parent.name[len("seed"):]] = _read(path)
    chosen = train_facts(infos).get("chosen_steps", {})
    return {arm: {"steps": [run["best_step"] for run in seeds.values()],
                  "nll": [run["validation_nll"] for run in seeds.values()]}
            for arm, seeds in chosen.items()}


def add_study(name, results, command, studies=STUDIES):
    """Copy a finished run's eval/summary.json into studies/<name>/ beside STUDY.json, which
    records this checkout's commit, `command`, today's date, results/data/data.json's
    provenance and each arm's chosen steps (_validation)."""
    results = Path(results)
    data = _read(results / "data" / "data.json")
    summary = results / "eval" / "summary.json"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout.strip()
    folder = Path(studies) / name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "summary.json", _read(summary))
    study = {"commit": commit, "command": command, "date": datetime.date.today().isoformat(),
             "data": {"source": data["source"], "path": data.get("path"),
                      **{f"{split}_sha256": info["sha256"]
                         for split, info in data.get("splits", {}).items()}},
             "validation": _validation(results)}
    write_json(folder / "STUDY.json", study)


def _ci(stat, scale=1.0, fmt="{:+.4f}"):
    lo, hi = (scale * x for x in stat["ci"])
    return f"{fmt.format(scale * stat['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _mean_sd(spread):
    return f"{spread['mean']:.4f}" + ("" if spread["std"] is None else f" ± {spread['std']:.4f}")


def _difference_row(arm, reference, entry):
    nll, gap = entry["nll"], entry["gap_recovered"]
    boot = nll.get("bootstrap")
    return (f"| {arm} − {reference} | {len(entry['seeds'])} | {_ci(nll)} | "
            f"{p_text(nll)} | "
            f"{'n/a' if not boot else '[{:+.4f}, {:+.4f}]'.format(*boot['ci'])} | "
            f"{'n/a' if gap is None else _ci(gap, 100, '{:.1f} %')} |")


def study_table(name, studies=STUDIES):
    """The README block of study `name`, from studies/<name>/{summary.json, STUDY.json}."""
    folder = Path(studies) / name
    summary, study = _read(folder / "summary.json"), _read(folder / "STUDY.json")
    data = study["data"]
    facts = {"data": {"source": data["source"], "path": data.get("path"),
                      "splits.test.sha256": data.get("test_sha256")}}
    lines = []
    if data["source"] == "synthetic":
        lines.append("**Synthetic problems, not GSM8K:** these numbers were measured on the "
                     "generator's problems (kava/synthetic.py).")
        lines.append("")
    validation = study.get("validation") or {}
    lines += [f"Study `{name}` on {data_source(facts)}: `{study['command']}` at commit "
              f"{study['commit'][:7]}, {study['date']} (studies/{name}/).", ""]
    if validation:
        lines += ["| model | answer NLL (mean ± SD over seeds) | validation NLL at the chosen "
                  "step (mean ± SD) | chosen steps |", "|---|---|---|---|"]
    else:
        lines += ["| model | answer NLL (mean ± SD over seeds) |", "|---|---|"]
    for label, model in summary["models"].items():
        kind = "teacher: " if model["kind"] == "teacher" else ""
        row = f"| {kind}{label} | {_mean_sd(model['nll'])} |"
        if validation:
            chosen = validation.get(label)
            row += (" — | — |" if not chosen else
                    f" {_mean_sd(spread_over_seeds(chosen['nll']))} | "
                    f"{', '.join(map(str, chosen['steps']))} |")
        lines.append(row)
    lines += ["", "| difference | seeds | answer NLL [95 % CI, headline] | p | "
                  "two-level bootstrap CI | gap recovered |", "|---|---|---|---|---|---|"]
    pairs = [(arm, summary["control"], entry) for arm, entry in summary["comparisons"].items()]
    pairs += [(c["arm"], c["reference"], c) for c in summary["contrasts"] if c["seeds"]]
    lines += [_difference_row(*pair) for pair in pairs if pair[2]]
    lines += ["", "(headline CI: t interval over seeds and examples; p: exact sign-flip test "
                  "over seeds, whose floor is 2/2^seeds: 0.25 at 3 seeds.)"]
    return "\n".join(lines) + "\n"


def render_readme(text, studies=STUDIES):
    """`text` with every study block replaced by study_table's rendering of it."""
    return BLOCK.sub(lambda m: m.group(1) + study_table(m.group(2), studies) + m.group(4), text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--add", metavar="NAME", help="commit a finished run as study NAME")
    parser.add_argument("--results", help="the run's results folder (with --add)")
    parser.add_argument("--command", help="the command that produced it (with --add)")
    parser.add_argument("--readme", help="rewrite this README's study blocks")
    args = parser.parse_args()
    try:
        if args.add:
            if not (args.results and args.command):
                raise KavaError("--add needs --results and --command")
            add_study(args.add, args.results, args.command)
        if args.readme:
            path = Path(args.readme)
            path.write_text(render_readme(path.read_text()))
    except KavaError as err:
        raise SystemExit(f"kava: error: {err}") from None


if __name__ == "__main__":
    main()
