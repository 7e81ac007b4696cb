# Data stage: demo archives (when no real ones are configured), validated manifests with a
# decoded image cache (ALL-IDB archives, labelled sets), the combined dataset, and the
# train/val/test splits.


rule make_demo_archives:
    output:
        idb1=f"{RESULTS}/demo/ALL_IDB1.zip",
        idb2=f"{RESULTS}/demo/ALL_IDB2.zip",
        groups=f"{RESULTS}/demo/slide_groups.csv",
    log:
        f"{LOGS}/demo/make_demo_archives.log",
    conda:
        "../envs/data.yaml"
    params:
        demo=S.demo,
    script:
        f"{SCRIPTS}/make_demo_archives.py"


rule ingest_archive:
    input:
        archive=archive_input,
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        images=f"{RESULTS}/data/{{dataset}}/images.npy",
    log:
        f"{LOGS}/data/{{dataset}}/ingest_archive.log",
    benchmark:
        f"{JOBSTATS}/data/{{dataset}}/ingest_archive.tsv"
    wildcard_constraints:
        dataset="ALL_IDB1|ALL_IDB2",
    conda:
        "../envs/data.yaml"
    params:
        image_size=S.data["image_size"],
        max_pixels=S.data["max_pixels"],
    script:
        f"{SCRIPTS}/ingest_archive.py"


rule ingest_labelled:
    input:
        source=labelled_input,
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        images=f"{RESULTS}/data/{{dataset}}/images.npy",
    log:
        f"{LOGS}/data/{{dataset}}/ingest_labelled.log",
    benchmark:
        f"{JOBSTATS}/data/{{dataset}}/ingest_labelled.tsv"
    wildcard_constraints:
        dataset=LABELLED,
    conda:
        "../envs/data.yaml"
    params:
        image_size=S.data["image_size"],
        max_pixels=S.data["max_pixels"],
        fingerprint=labelled_fingerprint,
    script:
        f"{SCRIPTS}/ingest_labelled.py"


rule combine_datasets:
    input:
        manifests=expand(
            f"{RESULTS}/data/{{archive}}/manifest.csv", archive=afs.ARCHIVES
        ),
        images=expand(f"{RESULTS}/data/{{archive}}/images.npy", archive=afs.ARCHIVES),
    output:
        manifest=f"{RESULTS}/data/combined/manifest.csv",
        images=f"{RESULTS}/data/combined/images.npy",
    log:
        f"{LOGS}/data/combined/combine_datasets.log",
    benchmark:
        f"{JOBSTATS}/data/combined/combine_datasets.tsv"
    conda:
        "../envs/data.yaml"
    script:
        f"{SCRIPTS}/combine_datasets.py"


rule make_splits:
    input:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        groups=groups_input,
    output:
        split=f"{RESULTS}/splits/{{dataset}}.json",
    log:
        f"{LOGS}/splits/{{dataset}}.log",
    benchmark:
        f"{JOBSTATS}/splits/{{dataset}}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        split=S.split,
    script:
        f"{SCRIPTS}/make_splits.py"
