SPLITS = ["train", "test"]
# The keys of `data` that decide which rows are prepared (max_length and on_too_long act per
# teacher, at precompute): changing only those must not redo the data and everything after it.
PREPARE_KEYS = ["source", "path", "train_size", "test_size", "seed", "on_bad_row"]


checkpoint prepare:
    """The configured data source → data/{train,test}.parquet + data.json (source, row hashes,
    skipped rows). A checkpoint: the number of precompute shards follows the rows it wrote."""
    output:
        train=f"{RESULTS}/data/train.parquet",
        test=f"{RESULTS}/data/test.parquet",
        info=f"{RESULTS}/data/data.json",
    params:
        data=as_json({key: config["data"][key] for key in PREPARE_KEYS}),
        env_data_path=PATHS["data_source"] or "",
        out_dir=f"{RESULTS}/data",
    log:
        log_path("prepare", "prepare"),
    benchmark:
        benchmark_path("prepare", "prepare")
    threads: config["threads"]
    conda:
        "../../envs/kava.yaml"
    shell:
        "python -m stages.prepare --threads {threads} --data {params.data:q} "
        "--env-data-path={params.env_data_path:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
