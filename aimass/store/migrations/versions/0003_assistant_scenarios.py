"""The voice assistant's sessions and tenants' scenarios.

Revision ID: 0003
Revises: 0002
Created: by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Written out rather than imported from schema.py (see 0001); names follow schema.metadata's naming convention.
    op.create_table(
        "assistant_sessions",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=False),
        sa.Column("messages", sa.Text(), nullable=False),
        sa.Column("created_unix_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_unix_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_unix_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "session_id", name="pk_assistant_sessions"),
    )
    op.create_index("ix_assistant_sessions_expires_unix_ms", "assistant_sessions", ["expires_unix_ms"])
    op.create_table(
        "scenarios",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("created_unix_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_unix_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", name="pk_scenarios"),
    )


def downgrade() -> None:
    op.drop_table("scenarios")
    op.drop_index("ix_assistant_sessions_expires_unix_ms", table_name="assistant_sessions")
    op.drop_table("assistant_sessions")
