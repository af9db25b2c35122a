"""The core's answer type reads Salesforce's body through any Content-Encoding an app may accept, and
never inflates more than it needs: a small answer that decompresses to gigabytes is cut."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import brotli
import pytest

from sidecar.token.messages import MAX_DECODED_BYTES, Answer, decode_bounded, zstd

TOKEN = json.dumps({"access_token": "00D!AQ", "refresh_token": "5Aep861", "token_type": "Bearer"}).encode()
ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstd.compress(data),
}


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_every_coding_an_app_may_accept_is_read(coding: str) -> None:
    answer = Answer(200, [(b"Content-Encoding", coding.upper().encode())], ENCODERS[coding](TOKEN))
    assert answer.content() == TOKEN


def test_raw_deflate_unknown_and_broken_codings() -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_bounded(raw.compress(TOKEN) + raw.flush(), "deflate", 1 << 20) == TOKEN
    assert decode_bounded(TOKEN, "compress", 1 << 20) == TOKEN  # unknown: as it came
    assert decode_bounded(b"not gzip at all", "gzip", 1 << 20) == b"not gzip at all"
    assert Answer(200, [], TOKEN).content() == TOKEN


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_a_decompression_bomb_is_cut_at_the_limit(coding: str) -> None:
    bomb = ENCODERS[coding](b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros: kilobytes compressed
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        out = Answer(200, [(b"Content-Encoding", coding.encode())], bomb).content()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out) == MAX_DECODED_BYTES
    assert peak < 4 * MAX_DECODED_BYTES, peak  # never the 64 MiB it would inflate to
