"""State that outlives a call: refresh token tracking (``grants``), the SQLite file it and the evidence
are kept in (``sqlite``), and the state replicas share on Redis (``redis``)."""
