"""Bytes on the wire: non-blocking TCP and TLS streams (``streams``), the one HTTP/1.1 codec on h11
(``http1``), a whole answer read into memory (``answer``), and connections to the servers behind the sidecar, direct or through a pair member,
pooled while it is safe (``upstream``). Nothing here knows Salesforce or policy."""
