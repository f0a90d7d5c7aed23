import shlex

# Paths every rule agrees on. A rule's log and benchmark live beside the results of its run.


def card(model):
    return f"{RESULTS}/models/{model}.json"


def log_path(rule_name, key="{model}"):
    return f"{RESULTS}/logs/{rule_name}/{key}.log"


def benchmark_path(rule_name, key="{model}"):
    return f"{RESULTS}/benchmarks/{rule_name}/{key}.tsv"


def path_arg(flag, paths):
    """`--flag 'path' ...` quoted for the shell, or "" for an optional input that is absent:
    a params function's string goes into the command as it is, so it must quote itself."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return f"{flag} {shlex.join(paths)}" if paths else ""


def as_json(section):
    """A config section for a stage's command line; quoting is done by `{params.x:q}`."""
    return json.dumps(section, sort_keys=True)


# ---- a SLURM run ------------------------------------------------------------------------------
if detect_scheduler()[0] == "slurm":
    # Inside a job: the stage, not this process, answers the time-limit warning.
    ignore_advance_warning()


def slurm_requests():
    """Per rule, what its SLURM jobs ask for: --cpus-per-task (cpus_per_task, else threads) and
    --mem (mem_mb). A value computed per job (a function) is not known before the DAG runs."""
    requests = {}
    for definition in workflow.rules:
        known = {name: resource.value for name, resource in definition.resources.items()
                 if not resource.is_evaluable()}
        requests[definition.name] = {"cpus": known.get("cpus_per_task") or known.get("_cores", 1),
                               "mem_mb": known.get("mem_mb", 0)}
    return requests

