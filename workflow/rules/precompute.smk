rule kv_basis:
    """A teacher's KV on the first precompute.basis_examples train rows → per stored layer and
    K/V the principal components keeping precompute.pca_variance (dtype: pca), stored once."""
    input:
        card=card("{teacher}"),
        data=data_path("train"),
        teacher_dims=dims_path("{teacher}"),
        student_card=student_card,
    output:
        basis=BASIS,
    params:
        precompute=as_json(config["precompute"]),
        max_length=config["data"]["max_length"],
        prompt_format=config["data"]["prompt_format"],
        layer_arguments=layer_arguments,
    resources:
        gpu=1,
    priority: PRIORITY["before_train"]
    log:
        log_path("kv_basis", "{teacher}"),
    benchmark:
        benchmark_path("kv_basis", "{teacher}")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.kv_basis --threads {threads} --card {input.card:q} "
        "--data {input.data:q} --precompute {params.precompute:q} "
        "--max-length {params.max_length} --prompt-format {params.prompt_format} "
        "--teacher-dims {input.teacher_dims:q} {params.layer_arguments} --out {output.basis:q} > {log:q} 2>&1"


rule precompute:
    """One teacher over one shard of a split → its K/V (safetensors, on scratch) + a sidecar."""
    input:
        card=card("{teacher}"),
        data=data_path("{split}"),
        teacher_dims=dims_path("{teacher}"),
        student_card=student_card,
        basis=basis,
    output:
        shard=SHARD_FILE,
        info=SHARD_INFO,
    params:
        precompute=as_json(config["precompute"]),
        max_length=config["data"]["max_length"],
        prompt_format=config["data"]["prompt_format"],
        on_too_long=config["data"]["on_too_long"],
        layer_arguments=layer_arguments,
        basis=lambda w, input: path_arg("--basis", input.basis),
        logits=logits_arguments,
    resources:
        gpu=1,
    priority: PRIORITY["before_train"]
    log:
        log_path("precompute", "{teacher}-{split}-{shard}"),
    benchmark:
        benchmark_path("precompute", "{teacher}-{split}-{shard}")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.precompute --threads {threads} --card {input.card:q} "
        "--data {input.data:q} --split {wildcards.split} --shard {wildcards.shard} "
        "--precompute {params.precompute:q} --max-length {params.max_length} "
        "--on-too-long {params.on_too_long} --prompt-format {params.prompt_format} "
        "--teacher-dims {input.teacher_dims:q} "
        "{params.layer_arguments} {params.basis} {params.logits} --shard-out {output.shard:q} "
        "--info {output.info:q} > {log:q} 2>&1"


rule kv_manifest:
    """All shards of a teacher x split → manifest.json, the one file training and eval read."""
    input:
        card=card("{teacher}"),
        data_info=DATA_INFO,
        shards=shard_paths(SHARD_FILE),
        infos=shard_paths(SHARD_INFO),
    output:
        manifest=manifest_path("{teacher}", "{split}"),
    priority: PRIORITY["before_train"]
    log:
        log_path("kv_manifest", "{teacher}-{split}"),
    benchmark:
        benchmark_path("kv_manifest", "{teacher}-{split}")
    threads: 1
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.kv_manifest --threads {threads} --card {input.card:q} "
        "--data-info {input.data_info:q} --split {wildcards.split} "
        "--shard-infos {input.infos:q} --out {output.manifest:q} > {log:q} 2>&1"
