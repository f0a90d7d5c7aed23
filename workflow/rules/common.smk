# The globals and input functions of every rule file live here, so the rule files hold rules
# only and their include order does not matter. The override refusals and a SLURM run's own
# needs are in resources.smk.
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError

from kava.config import cross_checked, kd_teachers
from kava.errors import KavaError
from kava.paths import run_paths

try:
    # Each training arm's own train config is the train section with the arm's overrides.
    CHECKED = cross_checked(config)
except KavaError as err:
    raise WorkflowError(f"kava: error: {err}") from None
MODELS = CHECKED["models"]
ARMS = CHECKED["arms"]
SEEDS = config["seeds"]
SPLITS = ["train", "test"]
KV_MODELS = [*config["teachers"], config["student"]]

PATHS = run_paths(config["run"])
RESULTS = PATHS["results"]
EVAL = f"{RESULTS}/eval"


# ---- paths every rule agrees on -------------------------------------------------------------
# A rule's log and benchmark live beside the results of its run. Each helper takes values or
# wildcard patterns ("{model}").


def card(model):
    return f"{RESULTS}/models/{model}.json"


def dims_path(model):
    return f"{RESULTS}/dims/{model}.json"


def data_path(split):
    return f"{RESULTS}/data/{split}.parquet"


DATA_INFO = f"{RESULTS}/data/data.json"
ENV = f"{RESULTS}/env.json"
REPORT = f"{RESULTS}/report.html"


def kv_dir(teacher, split):
    return f"{RESULTS}/kv/{teacher}/{split}"


def manifest_path(teacher, split):
    return f"{kv_dir(teacher, split)}/manifest.json"


# Big tensors on scratch, their small JSON sidecars beside the manifest.
SHARD_FILE = f"{PATHS['scratch']}/kv/{{teacher}}/{{split}}/shard-{{shard}}.safetensors"
SHARD_INFO = f"{kv_dir('{teacher}', '{split}')}/shards/shard-{{shard}}.json"
BASIS = f"{RESULTS}/kv/{{teacher}}/basis.safetensors"
CKA_MAPS = f"{RESULTS}/layer_maps/cka.json"


def train_dir(arm, seed):
    return f"{RESULTS}/train/{arm}/seed{seed}"


def eval_path(evaluated):
    return f"{EVAL}/{evaluated}.json"


def log_path(rule_name, key="{model}"):
    return f"{RESULTS}/logs/{rule_name}/{key}.log"


def benchmark_path(rule_name, key="{model}"):
    return f"{RESULTS}/benchmarks/{rule_name}/{key}.tsv"


TEACHER_DIMS = [dims_path(teacher) for teacher in config["teachers"]]
TRAIN_MANIFESTS = [manifest_path(teacher, "train") for teacher in config["teachers"]]
TEST_MANIFESTS = [manifest_path(teacher, "test") for teacher in config["teachers"]]
ALL_MANIFESTS = [manifest_path(teacher, split) for teacher in config["teachers"]
                 for split in SPLITS]


# ---- the order of ready jobs when cores are short ------------------------------------------
# Training jobs are the longest, so a run ends soonest when they start as early as possible:
# first the jobs that lead to training, then training, and the evaluations (short) fill the cores
# around them and at the end. Without this the scheduler ran evaluations as soon as they were
# ready, and the default run ended on one training job while the other core idled. A priority
# only orders jobs that are ready at once; it never holds one back.
PRIORITY = {"before_train": 2, "train": 1}


# ---- command lines --------------------------------------------------------------------------
def path_arg(flag, paths):
    """`--flag 'path' ...` quoted for the shell, or "" for an optional input that is absent:
    a params function's string goes into the command as it is, so it must quote itself."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return f"{flag} {shlex.join(paths)}" if paths else ""


def as_json(section):
    """A config section for a stage's command line; quoting is done by `{params.x:q}`."""
    return json.dumps(section, sort_keys=True)


# ---- data (data.smk) ------------------------------------------------------------------------
# The keys of `data` that decide which rows are prepared (max_length, on_too_long and
# prompt_format act per model, at precompute, training and evaluation): changing only those must
# not redo the data and everything after it.
PREPARE_KEYS = ["source", "path", "train_size", "validation_size", "test_size", "seed", "on_bad_row"]


# ---- models (models.smk) --------------------------------------------------------------------
def derive_base_card(wildcards):
    base = config["models"][wildcards.model].get("derive", {}).get("base")
    return [card(base)] if base else []


# ---- teacher KV (precompute.smk) ------------------------------------------------------------
MAPPED = config["precompute"]["layers"] == "mapped"


def student_card(wildcards):
    """The student (its depth, and the teacher layers a pruned one keeps) matters only to
    precompute.layers: mapped; depending on it otherwise would redo every teacher's KV whenever
    the student changes. (Stored logits are the teacher's own: training decides how to distil
    them, by whether the tokenizers match.)"""
    return [card(config["student"])] if MAPPED else []


def logits_arguments(wildcards):
    """--logits for the train split of a teacher whose logits an arm distils: only there are
    they read (evaluation reads the test split's KV only)."""
    return "--logits" if wildcards.teacher in KD_TEACHERS and wildcards.split == "train" else ""


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


def shard_paths(pattern):
    """An input function: every shard of the job's teacher x split, as pattern names them."""
    return lambda w: expand(pattern, teacher=w.teacher, split=w.split, shard=shard_ids(w))


# ---- training (train.smk) -------------------------------------------------------------------
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


# ---- evaluation (evaluate.smk) --------------------------------------------------------------
# The eval keys a job reads; eval.teachers only decides which jobs exist.
EVAL_KEYS = ["max_new_tokens", "batch_size", "dtype", "stop", "generate_examples", "noise_examples",
             "probe_examples", "probe_ridge"]


def evaluated_models():
    """{name: the evaluate job's inputs besides the test data}: the student before training
    (init), each teacher of eval.teachers (teacher-<name>), and each arm x seed (<arm>-seed<k>),
    by the name their files take under eval/."""
    named = [("init", {"card": card(config["student"])})]
    named += [(f"teacher-{teacher}", {"card": card(teacher)})
              for teacher in CHECKED["eval_teachers"]]
    for arm in ARMS:
        for seed in SEEDS:
            run = train_dir(arm, seed)
            named.append((f"{arm}-seed{seed}", {
                "model_dir": f"{run}/student", "projector": f"{run}/projector.safetensors",
                "train_info": f"{run}/train.json", "manifests": TEST_MANIFESTS,
                "train_manifests": TRAIN_MANIFESTS, "train_data": data_path("train"),
                "student_card": card(config["student"]), "teacher_dims": TEACHER_DIMS}))
    names = [name for name, _ in named]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise WorkflowError(f"kava: error: evaluated models clash on the name(s) {clashes} "
                            f"(init, teacher-<teacher>, <arm>-seed<k>); rename a teacher or arm")
    return dict(named)


EVALUATED = evaluated_models()


def model_args(wildcards, input):
    """--card for init and teachers, and for init the noise check, the evaluation's own
    numerical noise, once per run; a trained student's folder, projectors, train.json, the
    train split and the teachers' train- and test-split manifests for an arm."""
    if input.get("card"):
        noise_check = " --noise-check" if wildcards.evaluated == "init" else ""
        return path_arg("--card", input.card) + noise_check
    return " ".join(path_arg(flag, input.get(key)) for flag, key in (
        ("--model-dir", "model_dir"), ("--projector", "projector"), ("--train-info", "train_info"),
        ("--manifests", "manifests"), ("--train-manifests", "train_manifests"),
        ("--train-data", "train_data"), ("--student-card", "student_card"),
        ("--teacher-dims", "teacher_dims")))


# ---- report (report.smk) --------------------------------------------------------------------
# {arm: {seed: a file of its training run}} and the evaluation records, as the report reads them.
def per_run(name):
    return {arm: {seed: f"{train_dir(arm, seed)}/{name}" for seed in SEEDS} for arm in ARMS}


EVAL_FILES = {
    "init": eval_path("init"),
    "teachers": {t: eval_path(f"teacher-{t}") for t in CHECKED["eval_teachers"]},
    "arms": {arm: {seed: eval_path(f"{arm}-seed{seed}") for seed in SEEDS} for arm in ARMS},
}


# ---- model cards (model_card.smk) --------------------------------------------------------------


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


# Every wildcard of every rule, in one place.
wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    teacher="|".join(map(re.escape, config["teachers"])),
    split="|".join(SPLITS),
    shard=r"\d{5}",
    arm="|".join(map(re.escape, ARMS)),
    seed=r"\d+",
    evaluated="|".join(map(re.escape, EVALUATED)),
