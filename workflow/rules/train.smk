rule cka_layer_map:
    """Linear CKA between the initial student's and each teacher's per-layer K on a sample of
    train examples → the best stored teacher layer per student layer (layer_map: cka)."""
    input:
        student_card=card(config["student"]),
        teacher_cards=expand(card("{teacher}"), teacher=config["teachers"]),
        manifests=TRAIN_MANIFESTS,
        data=data_path("train"),
    output:
        maps=CKA_MAPS,
    params:
        examples=config["cka_layer_map"]["examples"],
        max_length=config["data"]["max_length"],
        prompt_format=config["data"]["prompt_format"],
        time_alignment=cka_time_alignment(),
    resources:
        gpu=1,
    priority: PRIORITY["before_train"]
    log:
        log_path("cka_layer_map", "cka"),
    benchmark:
        benchmark_path("cka_layer_map", "cka")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.cka_layer_map --threads {threads} --student-card {input.student_card:q} "
        "--teacher-cards {input.teacher_cards:q} --manifests {input.manifests:q} "
        "--data {input.data:q} --examples {params.examples} --max-length {params.max_length} "
        "--prompt-format {params.prompt_format} --time-alignment {params.time_alignment} "
        "--out {output.maps:q} > {log:q} 2>&1"


rule train:
    """One arm x seed: the student and its KV projectors trained from the teachers' stored KV.
    Checkpoints go to scratch, outside the outputs, so a rerun resumes instead of restarting."""
    input:
        student_card=card(config["student"]),
        student_dims=dims_path(config["student"]),
        teacher_cards=expand(card("{teacher}"), teacher=config["teachers"]),
        teacher_dims=TEACHER_DIMS,
        manifests=TRAIN_MANIFESTS,
        data=data_path("train"),
        validation=data_path("validation"),
        data_info=DATA_INFO,
        env=ENV,
        cka=cka_maps,
    output:
        student=directory(f"{train_dir('{arm}', '{seed}')}/student"),
        projector=f"{train_dir('{arm}', '{seed}')}/projector.safetensors",
        metrics=f"{train_dir('{arm}', '{seed}')}/metrics.jsonl",
        summary=f"{train_dir('{arm}', '{seed}')}/train.json",
    params:
        train=lambda w: as_json(ARMS[w.arm]),
        job=as_json(config["train_job"]),
        max_length=config["data"]["max_length"],
        prompt_format=config["data"]["prompt_format"],
        checkpoint_dir=lambda w: f"{PATHS['scratch']}/checkpoints/train/{w.arm}/seed{w.seed}",
        tracker_dir=f"{train_dir('{arm}', '{seed}')}/tb",
        launcher=train_launcher,
        cka=lambda w, input: path_arg("--cka-maps", input.cka),
    resources:
        gpu=config["train_job"]["gpus"],
    priority: PRIORITY["train"]
    log:
        log_path("train", "{arm}-seed{seed}"),
    benchmark:
        benchmark_path("train", "{arm}-seed{seed}")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "{params.launcher} stages.train --threads {threads} --arm {wildcards.arm} "
        "--seed {wildcards.seed} --train {params.train:q} --job {params.job:q} "
        "--student-card {input.student_card:q} --student-dims {input.student_dims:q} "
        "--teacher-cards {input.teacher_cards:q} --teacher-dims {input.teacher_dims:q} "
        "--manifests {input.manifests:q} --data {input.data:q} "
        "--validation-data {input.validation:q} --data-info {input.data_info:q} "
        "--env {input.env:q} --max-length {params.max_length} "
        "--prompt-format {params.prompt_format} {params.cka} "
        "--checkpoint-dir {params.checkpoint_dir:q} --tracker-dir {params.tracker_dir:q} "
        "--student-out {output.student:q} "
        "--projector-out {output.projector:q} --metrics-out {output.metrics:q} "
        "--summary-out {output.summary:q} > {log:q} 2>&1"
