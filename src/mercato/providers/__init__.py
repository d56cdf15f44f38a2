"""Simulated external services (a payment provider, a carrier, a mail server): real HTTP (and SMTP)
apps with fault injection.

They are separate systems: their own databases and schemas, their own processes or servers, reachable
only over HTTP. They import the kit and nothing of the shop.
"""

from mercato.providers._client import ProviderError
from mercato.providers._edge import ProviderApp, ResponseLost
from mercato.providers.carrier import CarrierClient, create_carrier_app
from mercato.providers.config import ProviderSettings
from mercato.providers.faults import FaultDecision, FaultInjector, FaultKind, FaultSettings, OutageWindow
from mercato.providers.mail import create_mail_app
from mercato.providers.psp import PspClient, create_psp_app
from mercato.providers.server import RunningProviders, serve_providers

__all__ = [
    "CarrierClient",
    "FaultDecision",
    "FaultInjector",
    "FaultKind",
    "FaultSettings",
    "OutageWindow",
    "ProviderApp",
    "ProviderError",
    "ProviderSettings",
    "PspClient",
    "ResponseLost",
    "RunningProviders",
    "create_carrier_app",
    "create_mail_app",
    "create_psp_app",
    "serve_providers",
]
