"""Rules tune_backbone and tune_worker: one worker of the Optuna study of one (dataset, fold,
backbone), on train and validation data only. A one-worker study's job (tune_backbone) then
writes the study's tables too, as collect_study does after several workers."""

from _common import context, inputs, run_rule, runtime

from allfuse.settings import TuneSettings
from allfuse.tuning import CollectJob, TuneJob, collect_study, tune


def main(smk, log):
    import optuna

    # Optuna's own handler writes to stderr only; send its trial lines into the rule's log too.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    job = TuneJob(
        dataset=smk.wildcards.dataset,
        backbone=smk.wildcards.backbone,
        base=dict(smk.params.base),
        tune=TuneSettings.from_params(smk.params.tune),
        data=inputs(smk, "train", "val", "manifest", "images"),  # never the test subset: not an input
        split=smk.input.split,
        out_record=smk.output.record,
        runtime=runtime(smk),
        context=context(smk),
        fold=int(smk.params.fold),
        worker=int(smk.params.worker),
    )
    record = tune(job)
    log.info("study %s, worker %d: ran trials %s", record["study"], record["worker"], record["trials"])
    if "best" in smk.output.keys():  # tune_backbone: the study's only worker
        best = collect_study(CollectJob.after(job, smk.output.best, smk.output.trials))
        log.info("study %s: best trial %d (%s = %.4g)", best["study"], best["trial"], best["objective"], best["value"])


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "tune_backbone")
