"""What operators and apps see: the admin server (``admin``), the status and its page (``status``), the
per-org view (``orgs``), the one record per token call that becomes a log line and metrics (``record``),
the audit trail's export (``audit``), the preflight ``check`` (``preflight``), and the CA and trust files
handed to apps with the app's environment (``trust``)."""
