# What a job gets is decided by the rules (threads: the config key threads, or 1 for a JSON
# merge; resources: gpu for a rule that runs a model); the profiles add only site facts (memory,
# run time, partition, GPU type). Here: the refusals that keep a profile or the command line from
# overriding the config without a word, and what a SLURM run needs before and inside its jobs.
from kava.cluster import ignore_advance_warning, partitions_from_sinfo, submission_problems
from kava.paths import detect_scheduler

if detect_scheduler()[0] == "slurm":
    # Inside a job: the stage, not this process, answers the time-limit warning.
    ignore_advance_warning()


def slurm_requests():
    """What the jobs of each submitted rule ask SLURM for (local rules run in this process),
    --cpus-per-task (cpus_per_task, else threads) and --mem (mem_mb). A value computed per job
    (a function) is not known before the DAG runs."""
    requests = {}
    for definition in workflow.rules:
        if workflow.is_local(definition):
            continue
        known = {name: resource.value for name, resource in definition.resources.items()
                 if not resource.is_evaluable()}
        requests[definition.name] = {"cpus": known.get("cpus_per_task") or known.get("_cores", 1),
                                     "mem_mb": known.get("mem_mb", 0)}
    return requests


def resource_limit(settings, name):
    """The global limit of a resource (--resources, profile or command line), or None."""
    limit = settings.resources.get(name)
    # Snakemake hands a parsed Resource or the plain value, depending on how it was given.
    return getattr(limit, "value", limit)


def refuse_overrides(settings):
    """A job's CPU threads come from the config key threads only, and a train job's GPUs from
    train_job.gpus only: a profile's or the command line's --set-threads, --set-resources or
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
                                f"the config key train_job.gpus; remove it and set train_job.gpus")
    # Snakemake cuts any resource down to its global limit (--resources) without a word.
    gpu_limit = resource_limit(settings, "gpu")
    gpus = config["train_job"]["gpus"]
    if gpu_limit is not None and gpus > gpu_limit:
        raise WorkflowError(f"kava: error: the config key train_job.gpus ({gpus}) exceeds the gpu "
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
