rule report:
    """Every evaluation, training log, KV manifest, dims file and benchmark of the run → the
    summary table, the kv − ce A/B with paired bootstrap CIs, plots and the run's facts."""
    input:
        evals=[eval_path(name) for name in EVALUATED],
        metrics=expand(f"{train_dir('{arm}', '{seed}')}/metrics.jsonl", arm=ARMS, seed=SEEDS),
        train_infos=expand(f"{train_dir('{arm}', '{seed}')}/train.json", arm=ARMS, seed=SEEDS),
        env=ENV,
        dims=[dims_path(model) for model in KV_MODELS],
        data_info=DATA_INFO,
        manifests=ALL_MANIFESTS,
        lm_evals=list(LM_EVAL_FILES.values()),
    output:
        html=report(REPORT, caption="../report/report.rst", category="Report"),
        markdown=f"{RESULTS}/report.md",
        summary=report(f"{EVAL}/summary.json", caption="../report/summary.rst", category="Report"),
        figures=report(directory(f"{RESULTS}/figures"), patterns=["{figure}.png"],
                       caption="../report/figures.rst", category="Figures"),
    params:
        evals=as_json(EVAL_FILES),
        metrics=as_json(per_run("metrics.jsonl")),
        train_infos=as_json(per_run("train.json")),
        report=as_json(config["report"]),
        lm_evals=path_arg("--lm-evals", [as_json(LM_EVAL_FILES)] if LM_EVAL_FILES else []),
        benchmarks=f"{RESULTS}/benchmarks",
        title=f"kava report: run {config['run']}",
    log:
        log_path("report", "report"),
    benchmark:
        benchmark_path("report", "report")
    threads: 1
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.report --threads {threads} --evals {params.evals:q} "
        "--metrics {params.metrics:q} --train-infos {params.train_infos:q} --env {input.env:q} --dims {input.dims:q} "
        "--data-info {input.data_info:q} {params.lm_evals} --manifests {input.manifests:q} "
        "--benchmarks-dir {params.benchmarks:q} --report {params.report:q} "
        "--title {params.title:q} --html {output.html:q} --markdown {output.markdown:q} "
        "--summary {output.summary:q} --figures {output.figures:q} > {log:q} 2>&1"
