"""The proxy the app talks to: the front door every client connection enters (``frontdoor``), who may
use it (``access``) and where it may connect (``destinations``), the token lane that terminates TLS for
token hosts (``lane``, with certificates from mitmproxy's store: ``leafcerts``, ``mitm``), the forwarder
for everything else on those hosts (``forward``), and tunnels relayed undecrypted (``relay``)."""
