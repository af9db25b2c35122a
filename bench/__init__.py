"""Benchmarks: the sidecar next to the alternatives, side by side in one run, on loopback.

``python -m bench`` (``make bench``) starts the simulated world (fake Salesforce, the fake QuotaGuard
pair, a bulk TLS server) in its own process, then Squid, plain ``mitmdump`` and the sidecar, measures
every figure for every contender in interleaved rounds with one client, writes ``bench/RESULTS.md``
and prints it. ``--quick`` is a smoke run with small counts.

Modules: ``world`` (the simulated world, run as a subprocess), ``contenders`` (starting and stopping
Squid, mitmdump and the sidecar), ``client`` (the one HTTP client every contender is measured with),
``profiled_sidecar`` (the sidecar with a cProfile switched on and off by signals), ``profile``
(summarising that profile), ``report`` (the Markdown) and ``run`` (the order of the measurements).
"""
