"""egress-sidecar: send Salesforce token calls through an allowlisted QuotaGuard Static IP."""

__version__ = "0.1.0"
