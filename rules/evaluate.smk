# Results: each backbone's deep ensemble, the fusion of the three hybrids (the paper's sum rule
# and further rules), figures per dataset, and the metric, paper-comparison and referral tables.
# The tables and figures are wired into `snakemake --report`. Each stage reads the run records
# (run.json) of the stage before it, which say themselves which dataset, backbone and seed they
# are; the predictions they name are listed as inputs too.

from allfuse.plots import PLOT_KINDS

EVALUATED_MEMBERS = [m for d in DATASETS for b in BACKBONES for m in member_dirs(d, b)]
EVALUATED_ENSEMBLES = [ensemble_dir(d, b) for d in DATASETS for b in BACKBONES]
EVALUATED_PLOTS = [f"{RESULTS}/plots/{d}/{k}.png" for d in DATASETS for k in PLOT_KINDS]


rule aggregate_ensemble:
    input:
        predictions=lambda w: [
            f"{m}/predictions.csv" for m in member_dirs(w.dataset, w.backbone)
        ],
        runs=lambda w: [f"{m}/run.json" for m in member_dirs(w.dataset, w.backbone)],
        parent=f"{RESULTS}/members/{{dataset}}/{{backbone}}/parent_run.json",
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        predictions=f"{RESULTS}/ensembles/{{dataset}}/{{backbone}}/predictions.csv",
        run=f"{RESULTS}/ensembles/{{dataset}}/{{backbone}}/run.json",
    log:
        f"{LOGS}/ensembles/{{dataset}}/{{backbone}}.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        evaluation=S.evaluation.as_params(),
    script:
        f"{SCRIPTS}/aggregate_ensemble.py"


rule fuse_predictions:
    input:
        ensembles=lambda w: [
            f"{ensemble_dir(w.dataset, b)}/predictions.csv" for b in BACKBONES
        ],
        ensemble_runs=lambda w: [
            f"{ensemble_dir(w.dataset, b)}/run.json" for b in BACKBONES
        ],
        # All members of all backbones: the fused uncertainty pools them.
        members=lambda w: [
            f"{m}/predictions.csv"
            for b in BACKBONES
            for m in member_dirs(w.dataset, b)
        ],
        member_runs=lambda w: [
            f"{m}/run.json" for b in BACKBONES for m in member_dirs(w.dataset, b)
        ],
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        predictions=f"{RESULTS}/fusion/{{dataset}}/predictions.csv",
        weights=f"{RESULTS}/fusion/{{dataset}}/weights.json",
        run=f"{RESULTS}/fusion/{{dataset}}/run.json",
    log:
        f"{LOGS}/fusion/{{dataset}}.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        evaluation=S.evaluation.as_params(),
        fold=FOLD,
    script:
        f"{SCRIPTS}/fuse_predictions.py"


rule plot_results:
    input:
        ensembles=lambda w: [
            f"{ensemble_dir(w.dataset, b)}/predictions.csv" for b in BACKBONES
        ],
        ensemble_runs=lambda w: [
            f"{ensemble_dir(w.dataset, b)}/run.json" for b in BACKBONES
        ],
        fusion=f"{RESULTS}/fusion/{{dataset}}/predictions.csv",
        fusion_run=f"{RESULTS}/fusion/{{dataset}}/run.json",
        split=f"{RESULTS}/splits/{{dataset}}.json",
    output:
        roc=report(
            f"{RESULTS}/plots/{{dataset}}/roc.png",
            caption="../report/roc.rst",
            category="Figures",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "ROC curves"},
        ),
        reliability=report(
            f"{RESULTS}/plots/{{dataset}}/reliability.png",
            caption="../report/reliability.rst",
            category="Figures",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "reliability diagrams"},
        ),
        uncertainty=report(
            f"{RESULTS}/plots/{{dataset}}/uncertainty.png",
            caption="../report/uncertainty.rst",
            category="Figures",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "uncertainty histograms"},
        ),
        referral=report(
            f"{RESULTS}/plots/{{dataset}}/referral.png",
            caption="../report/referral_plot.rst",
            category="Figures",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "referral curves"},
        ),
        confusion=report(
            f"{RESULTS}/plots/{{dataset}}/confusion.png",
            caption="../report/confusion.rst",
            category="Figures",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "confusion matrices"},
        ),
    log:
        f"{LOGS}/plots/{{dataset}}.log",
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
        fusion=[f"{RESULTS}/fusion/{d}/predictions.csv" for d in DATASETS],
        fusion_runs=[f"{RESULTS}/fusion/{d}/run.json" for d in DATASETS],
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
