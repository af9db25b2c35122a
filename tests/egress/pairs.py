"""A pair for the guard's and the evidence's unit tests: members whose egress IPs are already verified."""

from __future__ import annotations

from sidecar.config import load_settings
from sidecar.egress.pair import Pair, build_pair

URL = "http://u:p@127.0.0.2:9293"


def make_pair(*ips: str | None) -> Pair:
    settings = load_settings({"QUOTAGUARDSTATIC_URL": URL, "SIDECAR_PAIR": ",".join(f"127.0.0.{i + 2}:9293" for i in range(len(ips)))})
    pair = build_pair(settings)
    for member, ip in zip(pair.members, ips):
        if ip:
            member.samples.extend([ip, ip])
            member.up = True
    return pair
