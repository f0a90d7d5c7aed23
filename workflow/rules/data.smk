checkpoint prepare:
    """The configured data source → data/{train,validation,test}.parquet + data.json (source, row hashes,
    skipped rows). A checkpoint: the number of precompute shards follows the rows it wrote."""
    output:
        train=data_path("train"),
        validation=data_path("validation"),
        test=data_path("test"),
        info=DATA_INFO,
    params:
        data=as_json({key: config["data"][key] for key in PREPARE_KEYS}),
        env_data_path=PATHS["data_source"] or "",
        out_dir=lambda w, output: str(Path(output.info).parent),
    priority: PRIORITY["before_train"]
    log:
        log_path("prepare", "prepare"),
    benchmark:
        benchmark_path("prepare", "prepare")
    threads: config["threads"]
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.prepare --threads {threads} --data {params.data:q} "
        "--env-data-path={params.env_data_path:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
