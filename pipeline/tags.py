"""Every MLflow tag key retune writes, on runs and on registered model versions, defined once.

Lineage (what a version was built from), identity (what kind of model it is), the gates'
outcomes and verdicts, the promotion audit trail, and the process that ran the run. Readers
(the card, ``retune promote``, ``retune lineage``, tests) import the keys from here.
"""

from __future__ import annotations

# Lineage: the exact data, code, config and base model of a run.
DATA_MD5 = "retune.data_md5"  # DVC md5 of data/<dataset>/ (also the dataset input digest)
DATASET = "retune.dataset"
DATA_DVC_MD5 = "retune.data_dvc_md5"  # DVC md5 of the whole data/ (data.dvc outs)
DVC_REMOTE = "retune.dvc_remote"
GIT_COMMIT = "retune.git_commit"
GIT_DIRTY = "retune.git_dirty"
GIT_DIRTY_FILES = "retune.git_dirty_files"  # the files that made it dirty, or "none"
CONFIG_HASH = "retune.config_hash"
BASE_MODEL = "retune.base_model"
BASE_MODEL_SHA256 = "retune.base_model_sha256"
RETENTION_SUITE_MD5 = "retune.retention_suite_md5"  # DVC md5 of data/retention-suite
FLAGGED = "retune.flagged"  # data bias flags raised on the training data
FLOW_RUN = "retune.prefect_flow_run_id"  # the Prefect flow run that made the MLflow run

# Identity: a version of another kind never takes an alias of a model.
IDENTITY_TASK = "retune.identity.task"
IDENTITY_LABELS = "retune.identity.labels"  # JSON list, in the model's output order
IDENTITY_INPUT = "retune.identity.input"  # JSON object: input column -> type

# Gates: one status tag (passed | warned | refused | not run) and one human summary each.
VALIDATION = "retune.validation"  # summary: passed | passed with warnings
VALIDATION_REPORT = "retune.validation_report"  # artifact URI of the JSON summary
FORGETTING_GATE = "retune.forgetting_gate"
BIAS_GATE = "retune.bias_gate"
GATE_STATUS_PREFIX = "retune.gate."  # + gate name: the typed outcome's status


def gate_status(gate: str) -> str:
    """The tag key holding one gate's status."""
    return f"{GATE_STATUS_PREFIX}{gate}"


# Human summaries (gates, the policy's verdict) are cut to this length as tag values.
SUMMARY_CHARS = 4000

# Verdicts.
VERDICT = "retune.verdict"  # accepted | refused | skipped (scheduled run with nothing new)
POLICY = "retune.promotion_verdict"  # the promotion policy's summary
SKIP_REASON = "retune.skip_reason"
REGISTERED_VERSION = "retune.registered_version"


def test_metric(metric: str) -> str:
    """The tag key holding the test split's primary metric, e.g. retune.test_accuracy."""
    return f"retune.test_{metric}"


# The promotion audit trail, on the registered model (one tag per entry).
AUDIT_PREFIX = "retune.audit."

# The process that runs a run, to find orphans after a crash.
HOST = "retune.host"
PID = "retune.pid"
ORPHANED = "retune.orphaned"
