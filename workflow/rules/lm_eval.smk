rule lm_eval:
    """One trained student or evaluated teacher through lm-evaluation-harness (eval.lm_eval),
    offline, on the run's prepared rows: the harness's own scores, for the report."""
    input:
        unpack(lambda w: LM_EVALUATED[w.evaluated]),
        train_data=data_path("train"),
        test_data=data_path("test"),
        task_yamls=LM_EVAL_TASKS,
    output:
        scores=f"{EVAL}/lm_eval/{{evaluated}}.json",
    params:
        eval=as_json({key: config["eval"][key]
                      for key in ("lm_eval", "dtype", "batch_size", "max_new_tokens")}),
        model=lambda w, input: path_arg("--card", input.card) if input.get("card")
        else path_arg("--model-dir", input.model_dir),
    log:
        log_path("lm_eval", "{evaluated}"),
    benchmark:
        benchmark_path("lm_eval", "{evaluated}")
    threads: config["threads"]
    resources:
        gpu=1,
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.lm_eval --threads {threads} --name {wildcards.evaluated} {params.model} "
        "--eval {params.eval:q} --task-yamls {input.task_yamls:q} "
        "--train-data {input.train_data:q} --test-data {input.test_data:q} "
        "--out {output.scores:q} > {log:q} 2>&1"
