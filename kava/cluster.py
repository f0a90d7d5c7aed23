"""Checks made before a cluster run submits anything, and what a cluster job needs from the
workflow process it runs. Each problem is one line naming its culprit, so a run that would
sit in the queue forever, or fail in its first job, stops at once instead.

Knows nothing about Snakemake: the workflow passes plain values (see workflow/rules/resources.smk).
"""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

REQUIRED_VARIABLES = ("KAVA_SLURM_ACCOUNT", "KAVA_SLURM_PARTITION")


def ignore_advance_warning():
    """A train job is warned before its time limit by SIGUSR1 (profiles/slurm), which SLURM
    sends to every process of the job step: the Snakemake process that runs the job, its shell,
    and the stage. The stage catches it to checkpoint; the others would die of it (the default
    action) and take the stage with them. An ignored signal stays ignored across exec, so the
    shell ignores it too, while the stage installs its own handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def partitions_from_sinfo(run=subprocess.run):
    """{partition: {"cpus": most CPUs of one node, "mem_mb": most memory of one node}} from
    `sinfo`, or None where sinfo is not installed (not on a SLURM login node)."""
    if shutil.which("sinfo") is None:
        return None
    # One line per partition and node configuration: name (default marked *), CPUs, memory MB.
    out = run(["sinfo", "--noheader", "--format=%P %c %m"], capture_output=True, text=True,
              check=True).stdout
    partitions = {}
    for line in out.splitlines():
        name, cpus, mem = line.split()
        # A node's memory may read "123456+" when its nodes differ.
        node = {"cpus": int(cpus.rstrip("+")), "mem_mb": int(mem.rstrip("+"))}
        best = partitions.setdefault(name.rstrip("*"), node)
        best["cpus"], best["mem_mb"] = max(best["cpus"], node["cpus"]), max(best["mem_mb"], node["mem_mb"])
    return partitions


def scratch_problem(scratch):
    """None if a file can be created under scratch (made if missing), else why not."""
    try:
        Path(scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch):
            pass
    except OSError as err:
        return f"scratch {scratch} is not writable ({err.strerror}); set KAVA_SCRATCH to a " \
               f"writable shared folder"
    return None


def submission_problems(requests, scratch, environ=os.environ, partitions=None):
    """The reasons a SLURM run cannot go ahead, one line each; empty when it can.

    requests: {rule: {"cpus": int, "mem_mb": int}}, what each rule's jobs ask for.
    partitions: as from partitions_from_sinfo; None skips the resource check."""
    problems = [f"{name} is not set: export it (profiles/slurm submits with it)"
                for name in REQUIRED_VARIABLES if not environ.get(name)]
    if problem := scratch_problem(scratch):
        problems.append(problem)
    if partitions:
        most_cpus = max(p["cpus"] for p in partitions.values())
        most_mem = max(p["mem_mb"] for p in partitions.values())
        for rule, ask in sorted(requests.items()):
            if ask.get("cpus", 1) > most_cpus:
                problems.append(f"rule {rule} asks for {ask['cpus']} CPUs; the largest node of "
                                f"any partition has {most_cpus} CPUs (lower `threads` in the config)")
            if ask.get("mem_mb", 0) > most_mem:
                problems.append(f"rule {rule} asks for {ask['mem_mb']} MB; the largest node of "
                                f"any partition has {most_mem} MB (lower its mem_mb in the profile, "
                                f"e.g. --profile profiles/slurm-small)")
    return problems
