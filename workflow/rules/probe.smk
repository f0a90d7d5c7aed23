rule probe:
    """The device, precision, scheduler, CPUs, paths and packages of a compute job, and a
    micro-batch recommendation. It runs where the GPU jobs run, so it asks for a GPU too."""
    input:
        student_card=card(config["student"]),
        student_dims=dims_path(config["student"]),
        teacher_dims=TEACHER_DIMS,
    output:
        env=ENV,
    params:
        run=config["run"],
        seq_len=config["data"]["max_length"],
        effective_batch=config["train"]["effective_batch"],
    resources:
        gpu=1,
    priority: PRIORITY["before_train"]
    log:
        log_path("probe", "probe"),
    benchmark:
        benchmark_path("probe", "probe")
    threads: 1
    conda:
        "../envs/kava.yaml"
    shell:
        "python -m stages.probe --threads {threads} --run {params.run:q} "
        "--student-card {input.student_card:q} --student-dims {input.student_dims:q} "
        "--teacher-dims {input.teacher_dims:q} --seq-len {params.seq_len} "
        "--effective-batch {params.effective_batch} --out {output.env:q} > {log:q} 2>&1"
