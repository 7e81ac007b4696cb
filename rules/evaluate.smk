# Results: each backbone's deep ensemble, the fusion of the three hybrids (the paper's sum rule
# and further rules), figures per dataset, and the metric, paper-comparison and referral tables.
# The tables and figures are wired into `snakemake --report`. Each stage reads the run records
# (run.json) of the stage before it, which say themselves which dataset, backbone and seed they
# are; the predictions they name are listed as inputs too.

from allfuse.plots import PLOT_KINDS

EVALUATED_MEMBERS = [
    m for d in DATASETS for f in FOLDS for b in BACKBONES for m in member_dirs(d, f, b)
]
EVALUATED_ENSEMBLES = [
    ensemble_dir(d, f, b) for d in DATASETS for f in FOLDS for b in BACKBONES
]
EVALUATED_FUSIONS = [fusion_dir(d, f) for d in DATASETS for f in FOLDS]
EVALUATED_BASELINES = [
    f"{RESULTS}/baseline/{d}/fold{f}" for d in DATASETS for f in FOLDS
]
EVALUATED_PLOTS = [
    f"{RESULTS}/plots/{d}/fold{f}/{k}.png"
    for d in DATASETS
    for f in FOLDS
    for k in PLOT_KINDS
]


rule aggregate_ensemble:
    input:
        predictions=lambda w: [
            f"{m}/predictions.csv" for m in member_dirs(w.dataset, w.fold, w.backbone)
        ],
        runs=lambda w: [
            f"{m}/run.json" for m in member_dirs(w.dataset, w.fold, w.backbone)
        ],
        parent=f"{RESULTS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/parent_run.json",
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        predictions=f"{RESULTS}/ensembles/{{dataset}}/fold{{fold}}/{{backbone}}/predictions.csv",
        run=f"{RESULTS}/ensembles/{{dataset}}/fold{{fold}}/{{backbone}}/run.json",
    log:
        f"{LOGS}/ensembles/{{dataset}}/fold{{fold}}/{{backbone}}.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        evaluation=S.evaluation.as_params(),
        drop_collapsed=S.drop_collapsed,
    script:
        f"{SCRIPTS}/aggregate_ensemble.py"


rule fuse_predictions:
    input:
        ensembles=lambda w: [
            f"{ensemble_dir(w.dataset, w.fold, b)}/predictions.csv" for b in BACKBONES
        ],
        ensemble_runs=lambda w: [
            f"{ensemble_dir(w.dataset, w.fold, b)}/run.json" for b in BACKBONES
        ],
        # All members of all backbones: the fused uncertainty pools them.
        members=lambda w: [
            f"{m}/predictions.csv"
            for b in BACKBONES
            for m in member_dirs(w.dataset, w.fold, b)
        ],
        member_runs=lambda w: [
            f"{m}/run.json"
            for b in BACKBONES
            for m in member_dirs(w.dataset, w.fold, b)
        ],
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        predictions=f"{RESULTS}/fusion/{{dataset}}/fold{{fold}}/predictions.csv",
        weights=f"{RESULTS}/fusion/{{dataset}}/fold{{fold}}/weights.json",
        run=f"{RESULTS}/fusion/{{dataset}}/fold{{fold}}/run.json",
    log:
        f"{LOGS}/fusion/{{dataset}}/fold{{fold}}.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        evaluation=S.evaluation.as_params(),
        fusion=S.fusion.as_params(),
        fold=fold_of,
    script:
        f"{SCRIPTS}/fuse_predictions.py"


rule plot_results:
    input:
        ensembles=lambda w: [
            f"{ensemble_dir(w.dataset, w.fold, b)}/predictions.csv" for b in BACKBONES
        ],
        ensemble_runs=lambda w: [
            f"{ensemble_dir(w.dataset, w.fold, b)}/run.json" for b in BACKBONES
        ],
        fusion=f"{RESULTS}/fusion/{{dataset}}/fold{{fold}}/predictions.csv",
        fusion_run=f"{RESULTS}/fusion/{{dataset}}/fold{{fold}}/run.json",
        split=f"{RESULTS}/splits/{{dataset}}.json",
    output:
        roc=report(
            f"{RESULTS}/plots/{{dataset}}/fold{{fold}}/roc.png",
            caption="../report/roc.rst",
            category="Figures",
            subcategory="{dataset} fold {fold}",
            labels={"dataset": "{dataset}", "fold": "{fold}", "figure": "ROC curves"},
        ),
        reliability=report(
            f"{RESULTS}/plots/{{dataset}}/fold{{fold}}/reliability.png",
            caption="../report/reliability.rst",
            category="Figures",
            subcategory="{dataset} fold {fold}",
            labels={
                "dataset": "{dataset}",
                "fold": "{fold}",
                "figure": "reliability diagrams",
            },
        ),
        uncertainty=report(
            f"{RESULTS}/plots/{{dataset}}/fold{{fold}}/uncertainty.png",
            caption="../report/uncertainty.rst",
            category="Figures",
            subcategory="{dataset} fold {fold}",
            labels={
                "dataset": "{dataset}",
                "fold": "{fold}",
                "figure": "uncertainty histograms",
            },
        ),
        referral=report(
            f"{RESULTS}/plots/{{dataset}}/fold{{fold}}/referral.png",
            caption="../report/referral_plot.rst",
            category="Figures",
            subcategory="{dataset} fold {fold}",
            labels={
                "dataset": "{dataset}",
                "fold": "{fold}",
                "figure": "referral curves",
            },
        ),
        confusion=report(
            f"{RESULTS}/plots/{{dataset}}/fold{{fold}}/confusion.png",
            caption="../report/confusion.rst",
            category="Figures",
            subcategory="{dataset} fold {fold}",
            labels={
                "dataset": "{dataset}",
                "fold": "{fold}",
                "figure": "confusion matrices",
            },
        ),
    log:
        f"{LOGS}/plots/{{dataset}}/fold{{fold}}.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        ece_bins=S.evaluation.ece_bins,
    script:
        f"{SCRIPTS}/plot_results.py"


rule evaluate:
    input:
        members=[f"{m}/predictions.csv" for m in EVALUATED_MEMBERS],
        member_runs=[f"{m}/run.json" for m in EVALUATED_MEMBERS],
        ensembles=[f"{e}/predictions.csv" for e in EVALUATED_ENSEMBLES],
        ensemble_runs=[f"{e}/run.json" for e in EVALUATED_ENSEMBLES],
        baselines=[f"{b}/predictions.csv" for b in EVALUATED_BASELINES],
        baseline_runs=[f"{b}/run.json" for b in EVALUATED_BASELINES],
        fusion=[f"{f}/predictions.csv" for f in EVALUATED_FUSIONS],
        fusion_runs=[f"{f}/run.json" for f in EVALUATED_FUSIONS],
        splits=[f"{RESULTS}/splits/{d}.json" for d in DATASETS],
        plots=EVALUATED_PLOTS,
        store=ancient(STORE),
    output:
        metrics_csv=report(
            f"{RESULTS}/tables/metrics.csv",
            caption="../report/metrics.rst",
            category="Tables",
            labels={"table": "metrics (csv)"},
        ),
        metrics_md=report(
            f"{RESULTS}/tables/metrics.md",
            caption="../report/metrics_md.rst",
            category="Tables",
            labels={"table": "metrics (markdown)"},
        ),
        paper=report(
            f"{RESULTS}/tables/paper_comparison.md",
            caption="../report/paper_comparison.rst",
            category="Tables",
            labels={"table": "paper comparison"},
        ),
        referral=report(
            f"{RESULTS}/tables/referral.csv",
            caption="../report/referral.rst",
            category="Tables",
            labels={"table": "referral"},
        ),
        comparisons_csv=report(
            f"{RESULTS}/tables/comparisons.csv",
            caption="../report/comparisons.rst",
            category="Tables",
            labels={"table": "paired comparisons (csv)"},
        ),
        comparisons_md=report(
            f"{RESULTS}/tables/comparisons.md",
            caption="../report/comparisons.rst",
            category="Tables",
            labels={"table": "paired comparisons (markdown)"},
        ),
        run=f"{RESULTS}/tables/run.json",
    log:
        f"{LOGS}/tables/evaluate.log",
    benchmark:
        f"{JOBSTATS}/tables/evaluate.tsv"
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        evaluation=S.evaluation.as_params(),
    script:
        f"{SCRIPTS}/evaluate.py"


rule plot_folds:
    input:
        metrics=f"{RESULTS}/tables/metrics.csv",
    output:
        report(
            f"{RESULTS}/plots/fold_accuracy.png",
            caption="../report/fold_accuracy.rst",
            category="Figures",
            labels={"figure": "test accuracy per fold"},
        ),
    log:
        f"{LOGS}/plots/fold_accuracy.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        ci_level=S.evaluation.ci_level,
    script:
        f"{SCRIPTS}/plot_folds.py"
