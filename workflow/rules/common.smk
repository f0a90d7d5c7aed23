import shlex

# The globals and input functions of every rule file live here, so the rule files hold rules
# only and their include order does not matter.

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
    gpu_limit = getattr(settings._parsed_resources.get("gpu"), "value", None)
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


# ---- data (data.smk) ---------------------------------------------------------
SPLITS = ["train", "test"]
# The keys of `data` that decide which rows are prepared (max_length and on_too_long act per
# teacher, at precompute): changing only those must not redo the data and everything after it.
PREPARE_KEYS = ["source", "path", "train_size", "test_size", "seed", "on_bad_row"]


# ---- teacher KV (precompute.smk) ---------------------------------------------
KV = f"{RESULTS}/kv/{{teacher}}/{{split}}"
# Big tensors on scratch, their small JSON sidecars beside the manifest.
SHARD_FILE = f"{PATHS['scratch']}/kv/{{teacher}}/{{split}}/shard-{{shard}}.safetensors"
SHARD_INFO = f"{KV}/shards/shard-{{shard}}.json"
BASIS = f"{RESULTS}/kv/{{teacher}}/basis.safetensors"


wildcard_constraints:
    teacher="|".join(map(re.escape, config["teachers"])),
    split="|".join(SPLITS),
    shard=r"\d{5}",


MAPPED = config["precompute"]["layers"] == "mapped"


def student_card(wildcards):
    """The student (its depth, and the teacher layers a pruned one keeps) matters only to
    precompute.layers: mapped; depending on it otherwise would redo every teacher's KV whenever
    the student changes."""
    return [card(config["student"])] if MAPPED else []


def layer_arguments(wildcards, input):
    """--student-card and --arms (each arm's layer map settings) for precompute.layers: mapped;
    only then do they reach the job, so only then does changing them redo the KV."""
    if not MAPPED:
        return ""
    arms = {arm: {key: cfg[key] for key in ("layer_map", "explicit_layer_map")}
            for arm, cfg in ARMS.items()}
    return f"{path_arg('--student-card', input.student_card)} --arms {shlex.quote(as_json(arms))}"


def basis(wildcards):
    """The teacher's basis, for precompute.dtype: pca."""
    return [BASIS] if config["precompute"]["dtype"] == "pca" else []


def shard_ids(wildcards):
    """Shards of a split: as many as its prepared rows need (read once prepare has run)."""
    info = json.loads(Path(checkpoints.prepare.get().output.info).read_text())
    rows = info["splits"][wildcards.split]["rows"]
    per_shard = config["precompute"]["examples_per_shard"]
    return [f"{index:05d}" for index in range((rows + per_shard - 1) // per_shard)]


# ---- training (train.smk) ----------------------------------------------------
TRAIN = f"{RESULTS}/train/{{arm}}/seed{{seed}}"
CKA_MAPS = f"{RESULTS}/layer_maps/cka.json"
TRAIN_MANIFESTS = expand(f"{RESULTS}/kv/{{teacher}}/train/manifest.json", teacher=config["teachers"])


wildcard_constraints:
    arm="|".join(map(re.escape, ARMS)),
    seed=r"\d+",


def cka_time_alignment():
    """The time alignment of the arms that use the CKA maps: the maps are computed once, so
    those arms must agree on it (the base train section's value only if no arm uses them)."""
    alignments = sorted({arm_config["time_alignment"] for arm_config in ARMS.values()
                         if arm_config["layer_map"] == "cka"})
    if len(alignments) > 1:
        raise WorkflowError(f"kava: error: the arms with layer_map cka use time_alignment "
                            f"{' and '.join(alignments)}; the CKA maps are computed once, so give "
                            f"them one time_alignment")
    return alignments[0] if alignments else config["train"]["time_alignment"]


def cka_maps(wildcards):
    """The CKA layer maps, for an arm that uses them (otherwise the cka rule never runs)."""
    return [CKA_MAPS] if ARMS[wildcards.arm]["layer_map"] == "cka" else []


def train_launcher(wildcards, resources):
    """One process per GPU the job was given: under torchrun (DDP) when there are several."""
    if resources.gpu > 1:
        return f"torchrun --standalone --nproc_per_node {resources.gpu} -m"
    return "python -m"


# ---- models (models.smk) -----------------------------------------------------
def derive_base_card(wildcards):
    base = config["models"][wildcards.model].get("derive", {}).get("base")
    return [card(base)] if base else []


# ---- evaluation (evaluate.smk) -----------------------------------------------
# Every evaluated model, by the name its files take under eval/: the student before training
# (init), each teacher (teacher-<name>, with eval.teachers), and each arm x seed (<arm>-seed<k>).
EVAL = f"{RESULTS}/eval"
TEST_MANIFESTS = expand(f"{RESULTS}/kv/{{teacher}}/test/manifest.json", teacher=config["teachers"])
# The eval keys a job reads; eval.teachers only decides which jobs exist.
EVAL_KEYS = ["max_new_tokens", "batch_size", "dtype", "stop", "generate_examples", "probe_examples",
             "probe_ridge"]


def evaluated_models():
    """{name: the evaluate job's inputs besides the test data}."""
    named = [("init", {"card": card(config["student"])})]
    evaluated_teachers = config["eval"]["teachers"]
    if evaluated_teachers is True:
        evaluated_teachers = config["teachers"]
    for teacher in evaluated_teachers or []:
        if teacher not in config["teachers"]:
            raise WorkflowError(f"kava: error: eval.teachers names '{teacher}', which is not a "
                                f"teacher ({', '.join(config['teachers'])})")
        named.append((f"teacher-{teacher}", {"card": card(teacher)}))
    for arm in ARMS:
        for seed in SEEDS:
            run = f"{RESULTS}/train/{arm}/seed{seed}"
            named.append((f"{arm}-seed{seed}", {
                "model_dir": f"{run}/student", "projector": f"{run}/projector.safetensors",
                "train_info": f"{run}/train.json", "manifests": TEST_MANIFESTS,
                "train_manifests": TRAIN_MANIFESTS, "train_data": f"{RESULTS}/data/train.parquet",
                "student_card": card(config["student"]),
                "teacher_dims": expand(f"{RESULTS}/dims/{{teacher}}.json",
                                       teacher=config["teachers"])}))
    names = [name for name, _ in named]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise WorkflowError(f"kava: error: evaluated models clash on the name(s) {clashes} "
                            f"(init, teacher-<teacher>, <arm>-seed<k>); rename a teacher or arm")
    return dict(named)


EVALUATED = evaluated_models()


wildcard_constraints:
    evaluated="|".join(map(re.escape, EVALUATED)),


def model_args(wildcards, input):
    """--card for init and teachers; a trained student's folder, projectors, train.json, the
    train split and the teachers' train- and test-split manifests for an arm."""
    if input.get("card"):
        return path_arg("--card", input.card)
    return " ".join(path_arg(flag, input.get(key)) for flag, key in (
        ("--model-dir", "model_dir"), ("--projector", "projector"), ("--train-info", "train_info"),
        ("--manifests", "manifests"), ("--train-manifests", "train_manifests"),
        ("--train-data", "train_data"), ("--student-card", "student_card"),
        ("--teacher-dims", "teacher_dims")))


# ---- report (report.smk) -----------------------------------------------------
# The run's report: report.html + report.md, eval/summary.json, and the plots as PNG files for
# Snakemake's own report (`snakemake --report report.html`).
TRAIN_RUNS = {arm: {seed: f"{RESULTS}/train/{arm}/seed{seed}" for seed in SEEDS} for arm in ARMS}
EVAL_FILES = {
    "init": f"{EVAL}/init.json",
    "teachers": {t: f"{EVAL}/teacher-{t}.json" for t in config["teachers"]
                 if f"teacher-{t}" in EVALUATED},
    "arms": {arm: {seed: f"{EVAL}/{arm}-seed{seed}.json" for seed in SEEDS} for arm in ARMS},
}


# ---- model cards (model_card.smk) --------------------------------------------------------------
from types import SimpleNamespace


def student_base_card():
    """The card of the model the student derives from (derive.base), if it derives from one."""
    return derive_base_card(SimpleNamespace(model=config["student"]))


MODEL_CARDS = expand(f"{RESULTS}/train/{{arm}}/seed{{seed}}/hub", arm=ARMS, seed=SEEDS)


# ---- lm-evaluation-harness (lm_eval.smk) -------------------------------------------------------
# eval.lm_eval's tasks, run on every evaluated model but the untrained init: each teacher by its
# card, each arm x seed by its student folder. Empty when eval.lm_eval is [] (off).
LM_EVAL_TASKS = [f"{workflow.basedir}/lm_eval/{task}.yaml" for task in config["eval"]["lm_eval"]]
LM_EVALUATED = {name: {key: inputs[key] for key in ("card", "model_dir") if key in inputs}
                for name, inputs in EVALUATED.items()
                if config["eval"]["lm_eval"] and name != "init"}
LM_EVAL_FILES = {name: f"{EVAL}/lm_eval/{name}.json" for name in LM_EVALUATED}
