"""The application: the ``egress-sidecar`` command (``cli``), the wiring of one running sidecar and its
lifecycle (``service``), ``exec`` (run the app with its environment set) and the self-contained ``demo``."""
