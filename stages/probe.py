"""Stage probe: the environment a job runs in → env.json, plus a readable report.

Run by hand for a person: `python -m stages.probe --run default --student-card ... --dims ...`,
or with no model arguments at all for just the device, scheduler, paths and packages.
"""

import json

from kava.cli import run_stage, stage_parser
from kava.environment import probe_environment
from kava.io import read_json, write_json


def format_report(env):
    device, rec = env["device"], env.get("recommended")
    lines = [
        f"device     {device['type']}: {device['name']} x{device['count']}, "
        f"{device['memory_gb']} GB ({device['free_memory_gb']} GB free)",
        f"precision  {env['precision']}",
        f"scheduler  {env['scheduler']['type']}"
        + (f" (job {env['scheduler']['job_id']})" if env["scheduler"]["job_id"] else ""),
        f"cpus       {env['cpus']}",
        "paths      " + "\n           ".join(f"{k}: {v}" for k, v in env["paths"].items()),
        "packages   " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
    ]
    if rec:
        lines.append(f"recommend  micro_batch {rec['micro_batch']} x grad_accum "
                     f"{rec['grad_accum']} for effective batch {rec['effective_batch']}")
    return "\n".join(lines)


def main(args):
    sizing = None
    if args.student_card:
        sizing = {
            "student_params": read_json(args.student_card)["num_parameters"],
            "student_dims": read_json(args.student_dims),
            "teacher_dims": [read_json(path) for path in args.teacher_dims],
            "seq_len": args.seq_len,
            "effective_batch": args.effective_batch,
        }
    env = probe_environment(args.run, sizing)
    if args.out:
        write_json(args.out, env)
    print(format_report(env) if args.human else json.dumps(env, indent=2))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--run", default="default")
    parser.add_argument("--student-card")
    parser.add_argument("--student-dims")
    parser.add_argument("--teacher-dims", nargs="*", default=[])
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--effective-batch", type=int)
    parser.add_argument("--out", help="write env.json here")
    parser.add_argument("--json", dest="human", action="store_false",
                        help="print JSON instead of the readable report")
    run_stage(main, parser)
