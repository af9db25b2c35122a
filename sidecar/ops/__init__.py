"""What operators and apps see: the admin server (``admin``), the status and its page (``status``), the
one record per token call that becomes a log line and metrics (``record``), the preflight ``check``
(``preflight``), and the CA and trust files handed to apps with the app's environment (``trust``)."""
