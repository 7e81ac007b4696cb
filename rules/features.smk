# Head mode: each image's backbone feature map, once per (dataset, backbone, input size), with
# augmented views of training images only.


rule extract_features:
    input:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        images=f"{RESULTS}/data/{{dataset}}/images.npy",
        split=f"{RESULTS}/splits/{{dataset}}.json",
    output:
        train=f"{RESULTS}/features/{{dataset}}/fold{{fold}}/{{backbone}}/train.npz",
        val=f"{RESULTS}/features/{{dataset}}/fold{{fold}}/{{backbone}}/val.npz",
        test=f"{RESULTS}/features/{{dataset}}/fold{{fold}}/{{backbone}}/test.npz",
    log:
        f"{LOGS}/features/{{dataset}}/fold{{fold}}/{{backbone}}.log",
    benchmark:
        f"{JOBSTATS}/features/{{dataset}}/fold{{fold}}/{{backbone}}.tsv"
    conda:
        "../envs/train.yaml"
    threads: keras_threads
    resources:
        gpu=GPU,
        mem_mb=memory_of("features"),
        runtime=runtime_of("features"),
        tf_threads=tf_threads,
    params:
        features=features_of,
        fold=fold_of,
        deterministic=S.deterministic,
        gpu_locks=GPU_LOCKS,
    script:
        f"{SCRIPTS}/extract_features.py"
