"""Personal data sealed per customer, the keyring, erasures and the staff audit log (ADR 0052).

Expand only: the plaintext `email`/`display_name` columns become nullable and stay for rows
written before; the application seals such rows at start-up (`IdentityService.seal_legacy`).

Revision ID: 0027
Revises: 0021
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0027"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("identity_users") as batch:
        batch.add_column(sa.Column("email_lookup", sa.String(64), nullable=True))
        batch.add_column(sa.Column("email_sealed", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("display_name_sealed", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("erased_at", UTCDateTime, nullable=True))
        batch.alter_column("email", existing_type=sa.String(254), nullable=True)
        batch.alter_column("display_name", existing_type=sa.String(100), nullable=True)
        batch.create_unique_constraint("uq_identity_users_email_lookup", ["email_lookup"])
    op.create_table(
        "privacy_subject_keys",
        sa.Column("subject_id", sa.Uuid, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("subject_id", name="pk_privacy_subject_keys"),
    )
    op.create_table(
        "privacy_erasures",
        sa.Column("subject_id", sa.Uuid, nullable=False),
        sa.Column("erased_at", UTCDateTime, nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("subject_id", name="pk_privacy_erasures"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("resource", sa.String(300), nullable=False),
        sa.Column("subject_id", sa.Uuid, nullable=True),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_actor_at", "audit_log", ["actor", "at"])
    _append_only_triggers()


def _append_only_triggers() -> None:
    """The audit log cannot be edited, and a row is deleted only once past its retention period."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF TG_OP = 'UPDATE' THEN
                RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
              END IF;
              IF OLD.at > now() - interval '400 days' THEN
                RAISE EXCEPTION 'audit_log rows are kept 400 days' USING ERRCODE = 'insufficient_privilege';
              END IF;
              RETURN OLD;
            END $$;
            """
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
    else:
        op.execute(
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
        )
        # UTCDateTime is stored as 'YYYY-MM-DD HH:MM:SS.ffffff' text on SQLite, which sorts like the
        # time it names and compares with datetime()'s form.
        op.execute(
            "CREATE TRIGGER audit_log_kept BEFORE DELETE ON audit_log "
            "WHEN OLD.at > datetime('now', '-400 days') "
            "BEGIN SELECT RAISE(ABORT, 'audit_log rows are kept 400 days'); END"
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    op.drop_index("ix_audit_log_actor_at", table_name="audit_log")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("privacy_erasures")
    op.drop_table("privacy_subject_keys")
    with op.batch_alter_table("identity_users") as batch:
        batch.drop_constraint("uq_identity_users_email_lookup", type_="unique")
        batch.drop_column("erased_at")
        batch.drop_column("display_name_sealed")
        batch.drop_column("email_sealed")
        batch.drop_column("email_lookup")
