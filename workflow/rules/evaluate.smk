rule evaluate:
    """One model on the test split: greedy GSM8K accuracy, teacher-forced answer NLL, and for a
    trained student the held-out KV cosine against the teachers' test-split KV."""
    input:
        unpack(lambda w: EVALUATED[w.evaluated]),
        data=data_path("test"),
    output:
        record=eval_path("{evaluated}"),
        predictions=report(f"{EVAL}/{{evaluated}}/predictions.jsonl",
                           caption="../report/predictions.rst", category="Predictions",
                           labels={"model": "{evaluated}"}),
    params:
        eval=as_json({key: config["eval"][key] for key in EVAL_KEYS}),
        max_length=config["data"]["max_length"],
        prompt_format=config["data"]["prompt_format"],
        model=model_args,
    resources:
        gpu=1,
    log:
        log_path("evaluate", "{evaluated}"),
    benchmark:
        benchmark_path("evaluate", "{evaluated}")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.evaluate --threads {threads} --name {wildcards.evaluated} {params.model} "
        "--data {input.data:q} --eval {params.eval:q} --max-length {params.max_length} "
        "--prompt-format {params.prompt_format} --out {output.record:q} "
        "--predictions {output.predictions:q} > {log:q} 2>&1"
