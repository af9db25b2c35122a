"""Loopback simulations of Salesforce, a QuotaGuard Static proxy pair (each member's own address, or one
load-balanced address in front of both) and ip.quotaguard.com.

Why in the package: both the test suite and `egress-sidecar demo` (everything in one process) use
them. Each server runs its own asyncio loop in a daemon thread; see `_server.ThreadedServer`.
Only loopback addresses are ever bound or connected to.
"""

from .certs import TestCA, server_context
from .echo import EchoHit, FakeIPEcho
from .quotaguard import FakeQuotaGuardBalancer, FakeQuotaGuardMember, FakeQuotaGuardPair
from .salesforce import (
    EXPIRED_TOKEN_BODY,
    IP_RESTRICTED_BODY,
    FakeSalesforce,
    SeenRequest,
)

__all__ = [
    "EXPIRED_TOKEN_BODY", "IP_RESTRICTED_BODY", "EchoHit", "FakeIPEcho", "FakeQuotaGuardBalancer",
    "FakeQuotaGuardMember", "FakeQuotaGuardPair", "FakeSalesforce", "SeenRequest", "TestCA", "server_context",
]
