"""The model lifecycle: dataset versions and grants, model versions, deployments, training jobs, and the
deployments' sync generation.

Revision ID: 0002
Revises: 0001
Created: by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Written out rather than imported from schema.py (see 0001); names follow schema.metadata's naming convention.
    op.create_table(
        "dataset_versions",
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("task", sa.Integer(), nullable=False),
        sa.Column("format", sa.Integer(), nullable=False),
        sa.Column("text_column", sa.Text(), nullable=False),
        sa.Column("label_column", sa.Text(), nullable=False),
        sa.Column("classes", sa.Text(), nullable=False),
        sa.Column("report", sa.LargeBinary(), nullable=False),
        sa.Column("created_unix_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "name", "version", name="pk_dataset_versions"),
    )
    op.create_index("ix_dataset_versions_sha256", "dataset_versions", ["sha256"])
    op.create_table(
        "dataset_grants",
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("grantee", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("owner", "name", "grantee", name="pk_dataset_grants"),
    )
    op.create_index("ix_dataset_grants_grantee", "dataset_grants", ["grantee"])
    op.create_table(
        "model_versions",
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("task", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("dataset_owner", sa.String(64), nullable=False),
        sa.Column("dataset_name", sa.String(64), nullable=False),
        sa.Column("dataset_version", sa.String(16), nullable=False),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("hyperparameters", sa.LargeBinary(), nullable=False),
        sa.Column("evaluation", sa.LargeBinary(), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_bytes", sa.BigInteger(), nullable=False),
        sa.Column("export_sha256", sa.String(64), nullable=False),
        sa.Column("export_bytes", sa.BigInteger(), nullable=False),
        sa.Column("code_version", sa.Text(), nullable=False),
        sa.Column("created_unix_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "name", "version", name="pk_model_versions"),
    )
    op.create_index("ix_model_versions_artifact_sha256", "model_versions", ["artifact_sha256"])
    op.create_index("ix_model_versions_export_sha256", "model_versions", ["export_sha256"])
    op.create_table(
        "deployments",
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("default_version", sa.Integer(), nullable=False),
        sa.Column("canary_version", sa.Integer(), nullable=False),
        sa.Column("canary_percent", sa.Integer(), nullable=False),
        sa.Column("previous_version", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "name", name="pk_deployments"),
    )
    op.create_table(
        "training_jobs",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("created_unix_ms", sa.BigInteger(), nullable=False),
        sa.Column("job", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_training_jobs"),
    )
    op.create_index("ix_training_jobs_owner", "training_jobs", ["owner"])
    op.create_index("ix_training_jobs_state", "training_jobs", ["state"])
    state = op.create_table(
        "lifecycle_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("deployment_generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_lifecycle_state"),
    )
    op.bulk_insert(state, [{"id": 1, "deployment_generation": 0}])


def downgrade() -> None:
    op.drop_table("lifecycle_state")
    op.drop_index("ix_training_jobs_state", table_name="training_jobs")
    op.drop_index("ix_training_jobs_owner", table_name="training_jobs")
    op.drop_table("training_jobs")
    op.drop_table("deployments")
    op.drop_index("ix_model_versions_export_sha256", table_name="model_versions")
    op.drop_index("ix_model_versions_artifact_sha256", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_dataset_grants_grantee", table_name="dataset_grants")
    op.drop_table("dataset_grants")
    op.drop_index("ix_dataset_versions_sha256", table_name="dataset_versions")
    op.drop_table("dataset_versions")
