rule model_card:
    """One arm x seed's student → a publishable folder: its weights, tokenizer and a model card
    (README.md) with its provenance and the report's evaluation. A folder of its own, since the
    student folder is the train rule's output and the card needs the report's summary."""
    input:
        student=f"{train_dir('{arm}', '{seed}')}/student",
        train_info=f"{train_dir('{arm}', '{seed}')}/train.json",
        student_card=card(config["student"]),
        base_card=student_base_card(),
        teacher_cards=expand(card("{teacher}"), teacher=config["teachers"]),
        summary=f"{EVAL}/summary.json",
    output:
        publish=directory(f"{train_dir('{arm}', '{seed}')}/hub"),
    params:
        base_card=lambda w, input: path_arg("--base-card", input.base_card),
        prompt_format=config["data"]["prompt_format"],
    log:
        log_path("model_card", "{arm}-seed{seed}"),
    benchmark:
        benchmark_path("model_card", "{arm}-seed{seed}")
    threads: 1
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.model_card --threads {threads} --arm {wildcards.arm} "
        "--seed {wildcards.seed} --student {input.student:q} --train-info {input.train_info:q} "
        "--student-card {input.student_card:q} {params.base_card} "
        "--teacher-cards {input.teacher_cards:q} --summary {input.summary:q} "
        "--prompt-format {params.prompt_format} "
        "--out {output.publish:q} > {log:q} 2>&1"
