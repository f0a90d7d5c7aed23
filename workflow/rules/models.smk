rule materialize:
    """A configured model → local HF folder (safetensors + tokenizer) + its card."""
    input:
        base=derive_base_card,
    output:
        card=card("{model}"),
    params:
        spec=lambda w: as_json(config["models"][w.model]),
        model_dir=lambda w: f"{PATHS['models']}/{w.model}",
        base=lambda w, input: path_arg("--base-card", input.base),
    priority: PRIORITY["before_train"]
    log:
        log_path("materialize"),
    benchmark:
        benchmark_path("materialize")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.materialize --threads {threads} --name {wildcards.model} "
        "--spec {params.spec:q} --model-dir {params.model_dir:q} {params.base} "
        "--card {output.card:q} > {log:q} 2>&1"


rule dims:
    """One real forward → what the model's KV cache really looks like."""
    input:
        card=card("{model}"),
    output:
        dims=dims_path("{model}"),
    resources:
        gpu=1,
    priority: PRIORITY["before_train"]
    log:
        log_path("dims"),
    benchmark:
        benchmark_path("dims")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.dims --threads {threads} --card {input.card:q} "
        "--out {output.dims:q} > {log:q} 2>&1"
