"""Stage report: the run's evaluations, training logs and facts → report.html (self-contained),
report.md, eval/summary.json, and the plots as PNG files."""

from pathlib import Path

from kava.cli import json_arg, run_stage, stage_parser
from kava.io import atomic_path, write_json
from kava.report import build_summary, load_evals, load_facts, load_metrics, render_report


def main(args):
    evals = load_evals(args.evals)
    cfg = args.report
    summary = build_summary(evals, control=cfg["control"], contrasts=cfg["contrasts"],
                            n_boot=cfg["n_boot"], seed=cfg["seed"])
    facts = load_facts(env=args.env, dims={Path(path).stem: path for path in args.dims},
                       data_info=args.data_info, manifests=args.manifests,
                       benchmarks_dir=args.benchmarks_dir,
                       evaluation=evals["init"].get("settings"), train_infos=args.train_infos,
                       harness=args.lm_evals)
    html, markdown, plots = render_report(summary, evals, load_metrics(args.metrics), facts,
                                          title=args.title)
    with atomic_path(args.figures, is_dir=True) as tmp:
        for name, png in plots.items():
            (tmp / f"{name}.png").write_bytes(png)
    for path, text in ((args.html, html), (args.markdown, markdown)):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    write_json(args.summary, summary)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--evals", type=json_arg, required=True,
                        help='{"init": path, "teachers": {name: path}, "arms": {arm: {seed: path}}}')
    parser.add_argument("--metrics", type=json_arg, required=True,
                        help="{arm: {seed: metrics.jsonl}}")
    parser.add_argument("--train-infos", type=json_arg, help="{arm: {seed: train.json}}")
    parser.add_argument("--env", help="env.json")
    parser.add_argument("--dims", nargs="*", default=[], help="dims/<model>.json files")
    parser.add_argument("--data-info", help="data/data.json")
    parser.add_argument("--lm-evals", type=json_arg,
                        help="{model: eval/lm_eval/<model>.json}, with eval.lm_eval")
    parser.add_argument("--manifests", nargs="*", default=[], help="every KV manifest")
    parser.add_argument("--benchmarks-dir", help="the run's benchmarks/ folder")
    parser.add_argument("--report", type=json_arg, required=True, help="the report section, JSON")
    parser.add_argument("--title", required=True)
    parser.add_argument("--html", required=True)
    parser.add_argument("--markdown", required=True)
    parser.add_argument("--summary", required=True, help="eval/summary.json")
    parser.add_argument("--figures", required=True, help="folder for the plots as PNG files")
    run_stage(main, parser)
