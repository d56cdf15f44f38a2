"""Where the simulated providers listen and keep their data (a plain model: `mercato.config` merges it).

Kept free of environment reading on purpose: `mercato.config` is the one module that reads the
environment, and the lead adds a `providers: ProviderSettings` section there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from mercato.kit.balancing import OutlierSettings, Policy
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
    # Several instances of the payment provider (ADR 0039): the shop's PSP client balances over them
    # with `balance` and ejects outliers. Empty: the one simulator at host:psp_port. NoDecode: the
    # environment gives a comma list, not only JSON.
    psp_base_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    balance: Policy = Policy.LEAST_OUTSTANDING
    # Outlier ejection (Envoy's names and defaults, but 50 % not 10 %: 10 % of 3 hosts ejects none).
    outlier_consecutive_5xx: int = Field(default=5, ge=1)
    outlier_consecutive_local_failures: int = Field(default=5, ge=1)
    outlier_base_ejection_s: float = Field(default=30.0, gt=0)
    outlier_max_ejection_s: float = Field(default=300.0, gt=0)
    outlier_max_ejection_percent: float = Field(default=50.0, ge=0, le=100)

    @field_validator("psp_base_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def outlier(self) -> OutlierSettings:
        return OutlierSettings(
            consecutive_5xx=self.outlier_consecutive_5xx,
            consecutive_local_failures=self.outlier_consecutive_local_failures,
            base_ejection_s=self.outlier_base_ejection_s,
            max_ejection_s=max(self.outlier_max_ejection_s, self.outlier_base_ejection_s),
            max_ejection_percent=self.outlier_max_ejection_percent,
        )

    def psp_endpoints(self) -> list[str]:
        """Every PSP instance the shop calls: `psp_base_urls`, or the one at host:psp_port."""
        return [u.rstrip("/") for u in self.psp_base_urls] or [self.psp_base_url]

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
