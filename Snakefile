# allfuse: raw ALL-IDB archives -> manifests and splits -> Optuna studies -> ensemble members
# -> ensemble and fused predictions with uncertainty -> metric tables and plots.
# Rules live in rules/*.smk; all logic lives in the allfuse library; see docs/ARCHITECTURE.md.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


# Validated once, against schemas/config.schema.yaml: one line per bad key, defaults filled in.
try:
    from allfuse.config import validate_config
    from allfuse.errors import ConfigError
except ImportError as exc:
    raise WorkflowError(
        f"cannot import the allfuse library ({exc}); install the project first: "
        "see README, Quickstart"
    )
try:
    validate_config(config)
except ConfigError as exc:
    raise WorkflowError(str(exc))


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/features.smk"
include: "rules/tracking.smk"
include: "rules/tune.smk"
include: "rules/train.smk"
include: "rules/baseline.smk"
include: "rules/evaluate.smk"
include: "rules/package.smk"


rule all:
    default_target: True
    input:
        all_targets(),
