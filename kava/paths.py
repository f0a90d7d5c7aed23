"""Where a run's artifacts live. Pure stdlib: the Snakefile and the probe stage both use it,
so the paths Snakemake plans with are the paths the probe reports.

Per path: the KAVA_* variable, else a folder under results/<run>/. Nothing else in the
environment counts: on a cluster the Snakefile is parsed again inside every job, and a path
that followed the job's environment (SLURM_JOB_ID, a node-local $TMPDIR) would differ from
the one the submitting process waits for, so a job's output or a checkpoint its retry needs
would land where nobody looks. Node-local $TMPDIR stays free for temporary files only.
Nothing is created here: a path exists only once a stage writes to it.
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
    """The roots of a run: models, data, scratch, results (strings, absolute if set by env).

    Scratch defaults to results/<run>/scratch, which is wherever the results are, so it is
    shared whenever they are. On a cluster, set KAVA_SCRATCH to a big shared filesystem.
    """
    results = Path(environ.get("KAVA_OUTPUT_PATH") or Path(project_root) / "results") / run
    scratch = Path(environ["KAVA_SCRATCH"]) / run if environ.get("KAVA_SCRATCH") else results / "scratch"
    models = Path(environ["KAVA_MODEL_PATH"]) if environ.get("KAVA_MODEL_PATH") else results / "models"
    return {
        "models": str(models),
        "data": str(results / "data"),
        "data_source": environ.get("KAVA_DATA_PATH"),
        "scratch": str(scratch),
        "results": str(results),
    }
