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


rule evaluate:
    """One model on the test split: greedy GSM8K accuracy, teacher-forced answer NLL, and for a
    trained student the held-out KV cosine against the teachers' test-split KV."""
    input:
        unpack(lambda w: EVALUATED[w.evaluated]),
        data=f"{RESULTS}/data/test.parquet",
    output:
        record=f"{EVAL}/{{evaluated}}.json",
        predictions=report(f"{EVAL}/{{evaluated}}/predictions.jsonl",
                           caption="../report/predictions.rst", category="Predictions",
                           labels={"model": "{evaluated}"}),
    params:
        eval=as_json({key: config["eval"][key] for key in EVAL_KEYS}),
        max_length=config["data"]["max_length"],
        model=model_args,
    log:
        log_path("evaluate", "{evaluated}"),
    benchmark:
        benchmark_path("evaluate", "{evaluated}")
    threads: config["threads"]
    conda:
        "../../envs/kava.yaml"
    shell:
        "python -m stages.evaluate --threads {threads} --name {wildcards.evaluated} {params.model} "
        "--data {input.data:q} --eval {params.eval:q} --max-length {params.max_length} "
        "--out {output.record:q} --predictions {output.predictions:q} > {log:q} 2>&1"
