"""State that outlives a call: refresh token tracking (``grants``), the SQLite file it and the evidence
are kept in (``sqlite``), the refresh token expiry per org (``expiry``), the audit trail's file
(``audit``), and the state replicas share on Redis (``redis``)."""
