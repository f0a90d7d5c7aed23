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


def refuse_overrides(settings):
    """A job's CPU threads come from the config key threads only, and a train job's GPUs from
    train.gpus only: a profile's or the command line's --set-threads, --set-resources or
    --default-resources would otherwise win over the config without a word."""
    for rule_name in settings.overwrite_threads:
        raise WorkflowError(f"kava: error: --set-threads {rule_name}=… (profile or command line) "
                            f"overrides the config key threads; remove it and set threads")
    overrides = [(f"--set-resources {rule_name}:", rule_name, name)
                 for rule_name, resources in settings.overwrite_resources.items()
                 for name in resources]
    overrides += [("--default-resources ", None, name)
                  for name in (settings.default_resources or {})]
    for where, rule_name, name in overrides:
        if name == "cpus_per_task":
            raise WorkflowError(f"kava: error: {where}cpus_per_task (profile or command line) "
                                f"overrides the config key threads (SLURM gets cpus-per-task = "
                                f"threads); remove it and set threads")
        if rule_name == "train" and name == "gpu":
            raise WorkflowError(f"kava: error: {where}gpu (profile or command line) overrides "
                                f"the config key train.gpus; remove it and set train.gpus")
    # Snakemake cuts any resource down to its global limit (--resources) without a word.
    gpu_limit = getattr(settings._parsed_resources.get("gpu"), "value", None)
    gpus = max(arm_config["gpus"] for arm_config in ARMS.values())
    if gpu_limit is not None and gpus > gpu_limit:
        raise WorkflowError(f"kava: error: the config key train.gpus ({gpus}) exceeds the gpu "
                            f"resource {gpu_limit} (profile or --resources), which would "
                            f"cut it; raise it with --resources gpu={gpus}")


def refuse_core_cut(settings):
    """Local execution cuts a job's threads down to --cores without a word. Only known once the
    executor is (onstart): a SLURM job gets the CPUs it asks for, whatever --cores says."""
    if config["threads"] > settings.cores:
        raise WorkflowError(f"kava: error: the config key threads ({config['threads']}) exceeds "
                            f"--cores {settings.cores} (profile or command line), which would cut "
                            f"it; lower threads or raise --cores")


if workflow.is_main_process:
    refuse_overrides(workflow.resource_settings)
