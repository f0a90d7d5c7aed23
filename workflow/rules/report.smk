rule report:
    """Every evaluation, training log, KV manifest, dims file and benchmark of the run → the
    summary table, the kv − ce A/B with paired bootstrap CIs, plots and the run's facts."""
    input:
        evals=expand(f"{EVAL}/{{evaluated}}.json", evaluated=EVALUATED),
        metrics=[f"{run}/metrics.jsonl" for runs in TRAIN_RUNS.values() for run in runs.values()],
        train_infos=[f"{run}/train.json" for runs in TRAIN_RUNS.values() for run in runs.values()],
        env=f"{RESULTS}/env.json",
        dims=expand(f"{RESULTS}/dims/{{model}}.json", model=KV_MODELS),
        data_info=f"{RESULTS}/data/data.json",
        lm_evals=list(LM_EVAL_FILES.values()),
        manifests=expand(f"{RESULTS}/kv/{{teacher}}/{{split}}/manifest.json",
                         teacher=config["teachers"], split=SPLITS),
    output:
        html=report(f"{RESULTS}/report.html", caption="../report/report.rst", category="Report"),
        markdown=f"{RESULTS}/report.md",
        summary=report(f"{EVAL}/summary.json", caption="../report/summary.rst", category="Report"),
        figures=report(directory(f"{RESULTS}/figures"), patterns=["{figure}.png"],
                       caption="../report/figures.rst", category="Figures"),
    params:
        evals=as_json(EVAL_FILES),
        metrics=as_json({arm: {seed: f"{run}/metrics.jsonl" for seed, run in runs.items()}
                         for arm, runs in TRAIN_RUNS.items()}),
        train_infos=as_json({arm: {seed: f"{run}/train.json" for seed, run in runs.items()}
                             for arm, runs in TRAIN_RUNS.items()}),
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
        "../../envs/kava.yaml"
    shell:
        "python -m stages.report --threads {threads} --evals {params.evals:q} "
        "--metrics {params.metrics:q} --train-infos {params.train_infos:q} --env {input.env:q} --dims {input.dims:q} "
        "--data-info {input.data_info:q} {params.lm_evals} --manifests {input.manifests:q} "
        "--benchmarks-dir {params.benchmarks:q} --report {params.report:q} "
        "--title {params.title:q} --html {output.html:q} --markdown {output.markdown:q} "
        "--summary {output.summary:q} --figures {output.figures:q} > {log:q} 2>&1"
