"""Where token calls leave from: the QuotaGuard pair and its members (``pair``), which static IP each
leaves from (``discovery``), the typed allowlist (``allowlist``), what Salesforce answered through each
egress IP (``evidence``) and the guard that chooses a member from all of it (``guard``)."""
