"""Where a run's artifacts live. Pure stdlib: the Snakefile and the probe stage both use it,
so the paths Snakemake plans with are the paths the probe reports.

Order of precedence, per path: the KAVA_* variable, else $TMPDIR inside a batch job (scratch
only), else a folder under results/<run>/. Nothing is created here: a path exists only once
a stage writes to it.
"""

import os
from pathlib import Path

JOB_ID_VARIABLES = {
    "slurm": "SLURM_JOB_ID",
    "pbs": "PBS_JOBID",
    "sge": "SGE_TASK_ID",
    "lsf": "LSB_JOBID",
    "kubernetes": "KUBERNETES_SERVICE_HOST",
}


def detect_scheduler(environ=os.environ):
    """(scheduler type, job id) from the variables each batch system sets inside a job."""
    for scheduler, variable in JOB_ID_VARIABLES.items():
        if environ.get(variable):
            job_id = environ.get("HOSTNAME") if scheduler == "kubernetes" else environ[variable]
            return scheduler, job_id
    return "local", None


def run_paths(run, environ=os.environ, project_root="."):
    """The four roots of a run: models, data, scratch, results (strings, absolute if set by env).

    On a multi-node cluster, $TMPDIR is node-local and wiped after the job; set KAVA_SCRATCH to
    a shared filesystem there, or later jobs will not find the shards.
    """
    results = Path(environ.get("KAVA_OUTPUT_PATH") or Path(project_root) / "results") / run
    in_job = detect_scheduler(environ)[0] != "local"
    if environ.get("KAVA_SCRATCH"):
        scratch = Path(environ["KAVA_SCRATCH"]) / run
    elif in_job and environ.get("TMPDIR"):
        scratch = Path(environ["TMPDIR"]) / "kava" / run
    else:
        scratch = results / "scratch"
    models = Path(environ["KAVA_MODEL_PATH"]) if environ.get("KAVA_MODEL_PATH") else results / "models"
    return {
        "models": str(models),
        "data": str(results / "data"),
        "data_source": environ.get("KAVA_DATA_PATH"),
        "scratch": str(scratch),
        "results": str(results),
    }
