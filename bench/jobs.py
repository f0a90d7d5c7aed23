"""How the local profile should spend a machine's cores without a GPU: two of the default run's
jobs one after the other at two threads each (the local profile until it ran jobs side by side),
against the same two jobs at once at one thread each (what it does now), on the same inputs.
Prints the wall time of each side and their ratio (side by side ÷ one after the other), for a
pair of train jobs and a pair of evaluate jobs. The default pairs are two seeds of one arm: jobs
of about one length, as a run's scheduler sees them (it starts the next job as soon as one ends;
a pair of unequal jobs would also time the shorter one's idle core).

The jobs are the default run's own (make run first): their commands are those Snakemake would
run (`snakemake -n -p --forcerun train evaluate`), reading the run's models, stores and data;
what they write goes to a temporary folder, so the run's results are left as they are. On a
2-core CPU each pair takes a few minutes a round.

    python -m bench.jobs [--train kv-seed0 kv-seed1] [--evaluate kv-seed0 kv-seed1] [--repeats 1]
                         [snakemake arguments of the run, e.g. --configfile config/smoke.yaml]
"""

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PROJECT, emit, machine

# The options through which each stage writes: redirected into the temporary folder.
OUTPUTS = {"stages.train": ("--student-out", "--projector-out", "--metrics-out", "--summary-out",
                            "--checkpoint-dir", "--tracker-dir"),
           "stages.evaluate": ("--out", "--predictions")}


def planned_commands(workflow_args):
    """{(stage, name): argv} of every train and evaluate job of the run (the default, or what
    `workflow_args` make it), as Snakemake would run them; name is "<arm>-seed<k>" for a train
    job and the evaluated model's for an evaluate job."""
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "profiles/local", "-n", "-p",
         "--forcerun", "train", "evaluate", "--nolock", *workflow_args],
        cwd=PROJECT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"bench.jobs: the dry run of the run failed:\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    commands = {}
    for line in result.stdout.splitlines():
        line = line.removeprefix("Shell command: ")
        words = shlex.split(line) if line.startswith("python -m stages.") else []
        if len(words) < 3 or words[2] not in OUTPUTS:
            continue
        argv = [sys.executable, *words[1:words.index(">")]]
        name = (f"{value(argv, '--arm')}-seed{value(argv, '--seed')}"
                if words[2] == "stages.train" else value(argv, "--name"))
        commands[(words[2], name)] = argv
    return commands


def value(argv, option):
    return argv[argv.index(option) + 1]


def with_threads(argv, threads, workdir):
    """`argv` at `threads` threads, each output redirected into `workdir`."""
    argv = list(argv)
    argv[argv.index("--threads") + 1] = str(threads)
    for option in OUTPUTS[argv[2]]:
        at = argv.index(option) + 1
        argv[at] = str(Path(workdir) / f"{option.strip('-')}{Path(argv[at]).suffix}")
    return argv


def job_log(argv):
    """A job's log: beside its first redirected output."""
    folder = Path(argv[argv.index(OUTPUTS[argv[2]][0]) + 1]).parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "job.log"


def run_jobs(argvs):
    """Wall seconds of `argvs` run at once (each in its own process) until the last ends."""
    start = time.perf_counter()
    running = [(subprocess.Popen(argv, cwd=PROJECT, stdout=open(job_log(argv), "w"),
                                 stderr=subprocess.STDOUT), argv) for argv in argvs]
    for process, argv in running:
        if process.wait():
            raise SystemExit(f"bench.jobs: {' '.join(argv[:3])} failed; see {job_log(argv)}")
    return time.perf_counter() - start


def compare(pair, workdir, repeats):
    """{"serial_s", "side_by_side_s", "ratio"} of a pair of jobs: the fastest of `repeats`
    rounds of each side, the two sides alternating."""
    serial, parallel = [], []
    for round_ in range(repeats):
        base = Path(workdir) / f"round{round_}"
        serial.append(sum(run_jobs([with_threads(argv, 2, base / f"serial{i}")])
                          for i, argv in enumerate(pair)))
        parallel.append(run_jobs([with_threads(argv, 1, base / f"parallel{i}")
                                  for i, argv in enumerate(pair)]))
    return {"serial_s": round(min(serial), 1), "side_by_side_s": round(min(parallel), 1),
            "ratio": round(min(parallel) / min(serial), 3)}


def main():
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--train", nargs=2, default=["kv-seed0", "kv-seed1"],
                      help="two train jobs, <arm>-seed<k>")
    args.add_argument("--evaluate", nargs=2, default=["kv-seed0", "kv-seed1"],
                      help="two evaluate jobs, by the evaluated model's name")
    args.add_argument("--repeats", type=int, default=1)
    args, workflow_args = args.parse_known_args()
    commands = planned_commands(workflow_args)
    pairs = {"train": [("stages.train", name) for name in args.train],
             "evaluate": [("stages.evaluate", name) for name in args.evaluate]}
    for stage, name in (key for pair in pairs.values() for key in pair):
        argv = commands.get((stage, name))
        # A job whose inputs the run has not made yet would only fail part way.
        inputs = [] if argv is None else [argv[argv.index(option) + 1] for option in
                                          ("--data", "--model-dir") if option in argv]
        if argv is None or not all(map(Path.exists, map(Path, inputs))):
            raise SystemExit(f"bench.jobs: the run has no {stage} job {name} with its inputs "
                             f"made: run it first (make run)")
    figures = {"bench": "jobs", "machine": machine(2)}
    with tempfile.TemporaryDirectory() as workdir:
        for kind, pair in pairs.items():
            figures[kind] = {"jobs": [name for _, name in pair],
                             **compare([commands[key] for key in pair], Path(workdir) / kind,
                                       args.repeats)}
    emit(figures)


if __name__ == "__main__":
    main()
