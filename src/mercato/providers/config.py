"""Where the simulated providers listen and keep their data (a plain model: `mercato.config` merges it).

Kept free of environment reading on purpose: `mercato.config` is the one module that reads the
environment, and the lead adds a `providers: ProviderSettings` section there.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from mercato.providers.faults import FaultSettings

__all__ = ["ProviderSettings"]


class ProviderSettings(BaseModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    psp_port: int = Field(default=8100, ge=0, le=65535)
    carrier_port: int = Field(default=8101, ge=0, le=65535)
    # The mail provider: HTTP (`GET /messages`, faults) and SMTP, where the notifier sends.
    mail_port: int = Field(default=8102, ge=0, le=65535)
    mail_smtp_port: int = Field(default=2525, ge=0, le=65535)
    data_dir: Path = Path("./var")
    psp_database_url: str | None = Field(default=None, description="Default: SQLite `<data_dir>/psp.db`.")
    carrier_database_url: str | None = Field(
        default=None, description="Default: SQLite `<data_dir>/carrier.db`."
    )
    mail_database_url: str | None = Field(default=None, description="Default: SQLite `<data_dir>/mail.db`.")
    decline_rate: float = Field(default=0.0, ge=0, le=1)
    psp_faults: FaultSettings = Field(default_factory=FaultSettings)
    carrier_faults: FaultSettings = Field(default_factory=FaultSettings)
    mail_faults: FaultSettings = Field(default_factory=FaultSettings)
    graceful_shutdown_s: int = Field(
        default=2, gt=0, description="Hung requests are cancelled after this long on shutdown."
    )

    def psp_url(self) -> str:
        return self.psp_database_url or f"sqlite+aiosqlite:///{self.data_dir / 'psp.db'}"

    def carrier_url(self) -> str:
        return self.carrier_database_url or f"sqlite+aiosqlite:///{self.data_dir / 'carrier.db'}"

    def mail_url(self) -> str:
        return self.mail_database_url or f"sqlite+aiosqlite:///{self.data_dir / 'mail.db'}"

    @property
    def mail_base_url(self) -> str:
        return f"http://{self.host}:{self.mail_port}"

    @property
    def psp_base_url(self) -> str:
        return f"http://{self.host}:{self.psp_port}"

    @property
    def carrier_base_url(self) -> str:
        return f"http://{self.host}:{self.carrier_port}"
