KV = f"{RESULTS}/kv/{{teacher}}/{{split}}"
# Big tensors on scratch, their small JSON sidecars beside the manifest.
SHARD_FILE = f"{PATHS['scratch']}/kv/{{teacher}}/{{split}}/shard-{{shard}}.safetensors"
SHARD_INFO = f"{KV}/shards/shard-{{shard}}.json"


wildcard_constraints:
    teacher="|".join(map(re.escape, config["teachers"])),
    split="|".join(SPLITS),
    shard=r"\d{5}",


def student_card(wildcards):
    """The student (its depth, and the teacher layers a pruned one keeps) matters only to
    precompute.layers: mapped; depending on it otherwise would redo every teacher's KV whenever
    the student changes."""
    return [card(config["student"])] if config["precompute"]["layers"] == "mapped" else []


def shard_ids(wildcards):
    """Shards of a split: as many as its prepared rows need (read once prepare has run)."""
    info = json.loads(Path(checkpoints.prepare.get().output.info).read_text())
    rows = info["splits"][wildcards.split]["rows"]
    per_shard = config["precompute"]["examples_per_shard"]
    return [f"{index:05d}" for index in range((rows + per_shard - 1) // per_shard)]


rule precompute:
    """One teacher over one shard of a split → its K/V (safetensors, on scratch) + a sidecar."""
    input:
        card=card("{teacher}"),
        data=f"{RESULTS}/data/{{split}}.parquet",
        teacher_dims=f"{RESULTS}/dims/{{teacher}}.json",
        student_card=student_card,
    output:
        shard=SHARD_FILE,
        info=SHARD_INFO,
    params:
        precompute=as_json(config["precompute"]),
        max_length=config["data"]["max_length"],
        on_too_long=config["data"]["on_too_long"],
        student_card=lambda w, input: path_arg("--student-card", input.student_card),
    log:
        log_path("precompute", "{teacher}-{split}-{shard}"),
    benchmark:
        benchmark_path("precompute", "{teacher}-{split}-{shard}")
    threads: config["threads"]
    conda:
        "../../envs/kava.yaml"
    shell:
        "python -m stages.precompute --threads {threads} --card {input.card:q} "
        "--data {input.data:q} --split {wildcards.split} --shard {wildcards.shard} "
        "--precompute {params.precompute:q} --max-length {params.max_length} "
        "--on-too-long {params.on_too_long} --teacher-dims {input.teacher_dims:q} "
        "{params.student_card} --shard-out {output.shard:q} --info {output.info:q} > {log:q} 2>&1"


rule kv_manifest:
    """All shards of a teacher x split → manifest.json, the one file training and eval read."""
    input:
        card=card("{teacher}"),
        data_info=f"{RESULTS}/data/data.json",
        shards=lambda w: expand(SHARD_FILE, teacher=w.teacher, split=w.split, shard=shard_ids(w)),
        infos=lambda w: expand(SHARD_INFO, teacher=w.teacher, split=w.split, shard=shard_ids(w)),
    output:
        manifest=f"{KV}/manifest.json",
    log:
        log_path("kv_manifest", "{teacher}-{split}"),
    benchmark:
        benchmark_path("kv_manifest", "{teacher}-{split}")
    threads: config["threads"]
    conda:
        "../../envs/kava.yaml"
    shell:
        "python -m stages.kv_manifest --threads {threads} --card {input.card:q} "
        "--data-info {input.data_info:q} --split {wildcards.split} "
        "--shard-infos {input.infos:q} --out {output.manifest:q} > {log:q} 2>&1"
