"""Rule make_demo_archives: synthetic ALL-IDB archives in the official layout (the default data)."""

from pathlib import Path

from _common import run_rule

from allfuse.synthetic import DemoSpec, make_demo_archives


def main(smk, log):
    spec = DemoSpec(**smk.params.demo)
    out_dir = Path(smk.output.idb1).parent
    paths = make_demo_archives(out_dir, spec, fmt="zip")
    log.info("synthetic demo archives (seed %d): %s", spec.seed, {k: str(v) for k, v in paths.items()})


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "make_demo_archives")
