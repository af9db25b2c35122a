"""Tests for sidecar.egress.allowlist: parsing SIDECAR_ALLOWLIST and matching egress IPs."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar.egress.allowlist import (
    MAX_ADDRESSES,
    MAX_RANGES,
    Allowlist,
    AllowlistError,
    IPRange,
    parse_allowlist,
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def v4(n: int) -> IPv4Address:
    return IPv4Address(n)


def error_of(text: str, **kw) -> str:
    with pytest.raises(AllowlistError) as info:
        parse_allowlist(text, **kw)
    return str(info.value)


# --------------------------------------------------------------------------- forms


class TestForms:
    def test_none_and_blank_are_empty(self):
        for text in (None, "", "   ", ",,,", "\n \n", " , \n ,"):
            a = parse_allowlist(text)
            assert a == Allowlist(())
            assert len(a) == 0
            assert not a
            assert a.counts == (0, 0)
            assert not a.contains("203.0.113.7")

    def test_single_ipv4(self):
        a = parse_allowlist("203.0.113.7")
        assert a.ranges == (IPRange(ip_address("203.0.113.7"), ip_address("203.0.113.7")),)
        assert a.ranges[0].is_single and a.ranges[0].size == 1
        assert a.contains("203.0.113.7")
        assert not a.contains("203.0.113.8")
        assert not a.contains("203.0.113.6")
        assert a.counts == (0, 1)
        assert a

    def test_cidr_ipv4(self):
        (r,) = parse_allowlist("198.51.100.0/24").ranges
        assert (str(r.start), str(r.end)) == ("198.51.100.0", "198.51.100.255")
        assert r.size == 256 and not r.is_single
        assert str(r) == "198.51.100.0-198.51.100.255"

    def test_slash_32_and_128_are_single_addresses(self):
        a = parse_allowlist("203.0.113.7/32, 2001:db8::1/128")
        assert all(r.is_single for r in a.ranges)
        assert a.counts == (0, 2)
        assert [str(r) for r in a] == ["203.0.113.7", "2001:db8::1"]

    def test_range_with_equal_ends_is_single(self):
        a = parse_allowlist("203.0.113.7-203.0.113.7")
        assert a.counts == (0, 1)
        assert str(a) == "203.0.113.7"

    def test_start_end_range(self):
        a = parse_allowlist("10.0.0.1-10.0.0.9")
        (r,) = a.ranges
        assert r.size == 9 and a.counts == (1, 0)
        assert a.contains("10.0.0.1") and a.contains("10.0.0.5") and a.contains("10.0.0.9")
        assert not a.contains("10.0.0.0") and not a.contains("10.0.0.10")

    def test_range_across_octets(self):
        a = parse_allowlist("10.0.0.250-10.0.1.5")
        assert a.contains("10.0.0.255") and a.contains("10.0.1.0")
        assert a.ranges[0].size == 12

    def test_netmask_cidr_is_accepted(self):
        assert parse_allowlist("10.0.0.0/255.255.255.0") == parse_allowlist("10.0.0.0/24")

    def test_whole_space(self):
        a = parse_allowlist("0.0.0.0/0")
        assert a.contains("0.0.0.0") and a.contains("255.255.255.255")
        assert not a.contains("2001:db8::1")

    def test_mixed_list_keeps_order(self):
        a = parse_allowlist("203.0.113.7, 198.51.100.0/30, 10.0.0.1-10.0.0.3, 2001:db8::/126")
        assert [str(r) for r in a] == [
            "203.0.113.7",
            "198.51.100.0-198.51.100.3",
            "10.0.0.1-10.0.0.3",
            "2001:db8::-2001:db8::3",
        ]
        assert a.counts == (3, 1)
        assert len(a) == 4


class TestWhitespaceAndSeparators:
    def test_whitespace_around_items_and_dash(self):
        a = parse_allowlist("  203.0.113.7 ,\t10.0.0.1 - 10.0.0.9 ,  198.51.100.0/24  ")
        assert [str(r) for r in a] == [
            "203.0.113.7",
            "10.0.0.1-10.0.0.9",
            "198.51.100.0-198.51.100.255",
        ]

    def test_whitespace_around_slash(self):
        assert parse_allowlist("198.51.100.0 / 24") == parse_allowlist("198.51.100.0/24")

    def test_trailing_and_repeated_commas_are_ignored(self):
        assert parse_allowlist("203.0.113.7,,203.0.113.8,") == parse_allowlist(
            "203.0.113.7, 203.0.113.8"
        )

    def test_newlines_and_crlf(self):
        text = "203.0.113.7\r\n203.0.113.8\n\n10.0.0.0/30,\n2001:db8::1\n"
        a = parse_allowlist(text)
        assert [str(r) for r in a] == [
            "203.0.113.7",
            "203.0.113.8",
            "10.0.0.0-10.0.0.3",
            "2001:db8::1",
        ]

    def test_duplicates_are_kept_and_counted(self):
        a = parse_allowlist("203.0.113.7, 203.0.113.7, 10.0.0.0/24, 10.0.0.0/24")
        assert len(a) == 4
        assert a.counts == (2, 2)


class TestIPv6:
    def test_single_cidr_range(self):
        a = parse_allowlist("2001:db8::1, 2001:db8:1::/48, 2001:db8:2::10 - 2001:db8:2::20")
        assert a.contains("2001:db8::1")
        assert not a.contains("2001:db8::2")
        assert a.contains("2001:db8:1:ffff:ffff:ffff:ffff:ffff")
        assert not a.contains("2001:db8:2::")
        assert a.contains("2001:db8:2::15")
        assert not a.contains("2001:db8:2::21")
        assert a.counts == (2, 1)

    def test_ipv6_forms_are_normalised(self):
        a = parse_allowlist("2001:0DB8:0000::0001")
        assert str(a) == "2001:db8::1"
        assert a.contains("2001:db8:0::1")
        assert a.contains(IPv6Address("2001:db8::1"))

    def test_ipv6_does_not_match_unrelated_ipv4(self):
        a = parse_allowlist("::/0")
        assert a.contains("::1")
        assert not a.contains("10.0.0.1")  # plain IPv4 never matches an IPv6 entry
        assert a.contains("::ffff:10.0.0.1")  # literally inside ::/0

    def test_zone_index_in_query_is_ignored(self):
        a = parse_allowlist("fe80::/64")
        assert a.contains("fe80::1%eth0")


class TestMappedIPv4:
    def test_mapped_query_matches_ipv4_entry(self):
        a = parse_allowlist("203.0.113.7, 198.51.100.0/24")
        assert a.contains("::ffff:203.0.113.7")
        assert a.contains("::FFFF:198.51.100.42")
        assert a.contains(IPv6Address("::ffff:198.51.100.42"))
        assert not a.contains("::ffff:203.0.113.8")
        assert "::ffff:203.0.113.7" in a

    def test_ipv4_query_does_not_match_mapped_entry(self):
        # Not known that Salesforce maps IPv4 clients into IPv6 entries: stay strict.
        a = parse_allowlist("::ffff:203.0.113.7")
        assert not a.contains("203.0.113.7")
        assert a.contains("::ffff:203.0.113.7")

    def test_non_mapped_ipv6_does_not_match_ipv4(self):
        a = parse_allowlist("203.0.113.7")
        # ::cb00:7107 is the deprecated IPv4-compatible form, not mapped.
        assert not a.contains("::203.0.113.7")
        assert not a.contains("64:ff9b::203.0.113.7")

    def test_iprange_contains_uses_same_rule(self):
        r = IPRange.single(ip_address("203.0.113.7"))
        assert "::ffff:203.0.113.7" in r
        assert ip_address("203.0.113.7") in r
        assert "203.0.113.8" not in r
        assert "203.0.113.7" not in IPRange.single(ip_address("::ffff:203.0.113.7"))


# --------------------------------------------------------------------------- queries


class TestQueries:
    a = parse_allowlist("203.0.113.7, 203.0.113.8, 198.51.100.0/24")

    @pytest.mark.parametrize(
        "junk",
        [
            "",
            "   ",
            "not-an-ip",
            "203.0.113",
            "203.0.113.7/32",
            "[::1]",
            "203.0.113.7:443",
            "\x00",
            None,
            42,
            3.5,
            b"203.0.113.7",
            object(),
            ["203.0.113.7"],
        ],
    )
    def test_contains_never_raises_on_junk(self, junk):
        assert self.a.contains(junk) is False
        assert (junk in self.a) is False

    def test_contains_strips_whitespace(self):
        assert self.a.contains(" 203.0.113.7\n")

    def test_contains_accepts_address_objects(self):
        assert self.a.contains(IPv4Address("198.51.100.200"))
        assert not self.a.contains(IPv4Address("198.51.101.0"))

    def test_missing_keeps_order_and_reports_junk(self):
        ips = ["203.0.113.9", "203.0.113.7", "bogus", "198.51.100.1", "192.0.2.1", "203.0.113.9"]
        assert self.a.missing(ips) == ["203.0.113.9", "bogus", "192.0.2.1", "203.0.113.9"]
        assert self.a.missing([]) == []
        assert self.a.missing(iter(["203.0.113.8"])) == []

    def test_empty_allowlist_misses_everything(self):
        assert Allowlist().missing(["203.0.113.7"]) == ["203.0.113.7"]

    def test_describe(self):
        d = self.a.describe()
        assert "3 entries" in d
        assert "1 range of 128" in d
        assert "2 single addresses of 256" in d
        assert "203.0.113.7" in d and "198.51.100.0-198.51.100.255" in d
        assert "empty" in Allowlist().describe()

    def test_describe_truncates_long_lists(self):
        a = parse_allowlist(",".join(f"10.0.0.{i}" for i in range(40)))
        d = a.describe()
        assert "40 entries" in d and "and 30 more" in d
        assert "10.0.0.39" not in d

    def test_covered(self):
        assert self.a.covered == 258
        assert Allowlist().covered == 0

    def test_str_round_trips(self):
        assert parse_allowlist(str(self.a)) == self.a

    def test_equality_and_hash(self):
        b = parse_allowlist("203.0.113.7,203.0.113.8,198.51.100.0-198.51.100.255")
        assert b == self.a and hash(b) == hash(self.a)

    def test_allowlist_constructor_accepts_list(self):
        a = Allowlist([IPRange.single(ip_address("203.0.113.7"))])  # type: ignore[arg-type]
        assert isinstance(a.ranges, tuple) and a.contains("203.0.113.7")

    def test_allowlist_constructor_rejects_non_ranges(self):
        with pytest.raises(TypeError):
            Allowlist(("203.0.113.7",))  # type: ignore[arg-type]

    def test_frozen(self):
        with pytest.raises(AttributeError):
            self.a.ranges = ()  # type: ignore[misc]


class TestIPRange:
    def test_direct_construction_validates(self):
        with pytest.raises(AllowlistError, match="ends before it starts"):
            IPRange(v4(10), v4(9))
        with pytest.raises(AllowlistError, match="mixed IPv4/IPv6"):
            IPRange(v4(1), IPv6Address(1))
        with pytest.raises(TypeError):
            IPRange("10.0.0.1", "10.0.0.2")  # type: ignore[arg-type]

    def test_size_str_single(self):
        r = IPRange(v4(0), v4(2**32 - 1))
        assert r.size == 2**32 and not r.is_single
        assert str(r) == "0.0.0.0-255.255.255.255"
        s = IPRange.single(IPv6Address("::1"))
        assert s.size == 1 and s.is_single and str(s) == "::1"

    def test_contains_other_version_without_mapping(self):
        r = IPRange(IPv6Address("2001:db8::"), IPv6Address("2001:db8::ff"))
        assert "10.0.0.1" not in r
        assert "2001:db8::7f" in r
        assert "junk" not in r


# --------------------------------------------------------------------------- errors


class TestErrors:
    def test_not_an_ip_names_item_setting_and_forms(self):
        msg = error_of("203.0.113.7, 10.0.0.1, 10.0.0.300")
        assert "'10.0.0.300' is not an IP address, CIDR or START-END range" in msg
        assert "(item 3 of SIDECAR_ALLOWLIST)" in msg
        assert "203.0.113.0/24" in msg  # shows the accepted forms

    def test_item_number_ignores_empty_items(self):
        msg = error_of("203.0.113.7,,\n, nope")
        assert "item 2 of SIDECAR_ALLOWLIST" in msg

    def test_custom_setting_name(self):
        msg = error_of("nope", setting="MY_SETTING")
        assert "item 1 of MY_SETTING" in msg

    def test_range_backwards(self):
        msg = error_of("10.0.0.9-10.0.0.1")
        assert "range 10.0.0.9-10.0.0.1 ends before it starts" in msg
        assert "item 1 of SIDECAR_ALLOWLIST" in msg
        assert "did you mean 10.0.0.1-10.0.0.9?" in msg

    def test_range_backwards_ipv6(self):
        msg = error_of("2001:db8::9 - 2001:db8::1")
        assert "ends before it starts" in msg and "did you mean 2001:db8::1-2001:db8::9?" in msg

    def test_mixed_range(self):
        msg = error_of("203.0.113.7, 10.0.0.1-2001:db8::1")
        assert "mixed IPv4/IPv6 range" in msg
        assert "'10.0.0.1-2001:db8::1'" in msg
        assert "item 2 of SIDECAR_ALLOWLIST" in msg
        assert "both be IPv4 or both be IPv6" in msg

    def test_mixed_range_with_mapped_end_is_still_mixed(self):
        assert "mixed IPv4/IPv6 range" in error_of("10.0.0.1-::ffff:10.0.0.9")

    def test_range_bad_end(self):
        msg = error_of("10.0.0.1-10.0.0.256")
        assert "'10.0.0.256' in range '10.0.0.1-10.0.0.256' is not an IP address" in msg
        assert "item 1 of SIDECAR_ALLOWLIST" in msg

    def test_range_missing_end(self):
        msg = error_of("10.0.0.1-")
        assert "has no end" in msg and "START-END" in msg
        assert "has no start" in error_of("- 10.0.0.1")

    def test_range_with_two_dashes(self):
        msg = error_of("10.0.0.1-10.0.0.5-10.0.0.9")
        assert "exactly one '-'" in msg and "'10.0.0.1-10.0.0.5-10.0.0.9'" in msg

    def test_range_of_cidrs(self):
        msg = error_of("10.0.0.0/24-10.0.1.0/24")
        assert "'10.0.0.0/24' in range" in msg
        assert "write a CIDR on its own" in msg

    def test_cidr_host_bits(self):
        msg = error_of("10.0.0.5/24")
        assert "'10.0.0.5/24' has host bits set" in msg
        assert "item 1 of SIDECAR_ALLOWLIST" in msg
        assert "did you mean 10.0.0.0/24?" in msg
        assert "10.0.0.5 alone" in msg

    def test_cidr_host_bits_ipv6(self):
        msg = error_of("2001:db8::1/64")
        assert "did you mean 2001:db8::/64?" in msg

    @pytest.mark.parametrize(
        ("item", "fix"),
        [
            ("10.0.0.0/33", "/0 to /32"),
            ("2001:db8::/129", "/0 to /128"),
            ("10.0.0.0/", "/0 to /32"),
            ("10.0.0.0/x", "/0 to /32"),
            ("10.0.0.0/-1", None),
        ],
    )
    def test_cidr_bad_prefix(self, item, fix):
        msg = error_of(item)
        assert repr(item) in msg or "'10.0.0.0/'" in msg
        if fix:
            assert "invalid prefix length" in msg and fix in msg

    def test_cidr_bad_address(self):
        msg = error_of("10.0.0.300/24")
        assert "'10.0.0.300/24' is not an IP address" in msg

    def test_cidr_two_slashes(self):
        assert "exactly one '/'" in error_of("10.0.0.0/24/8")

    @pytest.mark.parametrize(
        ("item", "fix"),
        [
            ("203.0.113.7 203.0.113.8", "separate entries with commas"),
            ("203.0.113.7;203.0.113.8", "not semicolons"),
            ("fe80::1%eth0", "zone index"),
            ("[2001:db8::1]", "remove the brackets"),
            ("203.0.113.7:443", "remove the port"),
            ("proxy.example.com", "not a host name"),
            ("http://203.0.113.7/", "not a URL"),
            ("010.0.0.1", "leading zeros"),
        ],
    )
    def test_common_mistakes_get_specific_fixes(self, item, fix):
        msg = error_of(f"203.0.113.1, {item}")
        assert repr(item) in msg
        assert "item 2 of SIDECAR_ALLOWLIST" in msg
        assert fix in msg

    def test_long_item_is_truncated_in_message(self):
        msg = error_of("x" * 5000)
        assert len(msg) < 400 and "..." in msg

    def test_non_string_is_type_error(self):
        with pytest.raises(TypeError):
            parse_allowlist(["203.0.113.7"])  # type: ignore[arg-type]

    def test_allowlist_error_is_value_error(self):
        assert issubclass(AllowlistError, ValueError)


# --------------------------------------------------------------------------- limits


def _ranges(n: int) -> list[str]:
    # n distinct two-address ranges: 10.x.y.0-10.x.y.1
    return [f"10.{i // 256}.{i % 256}.0-10.{i // 256}.{i % 256}.1" for i in range(n)]


def _singles(n: int) -> list[str]:
    return [f"172.16.{i // 256}.{i % 256}" for i in range(n)]


class TestLimits:
    def test_128_ranges_ok(self):
        a = parse_allowlist(", ".join(_ranges(MAX_RANGES)))
        assert a.counts == (128, 0)

    def test_129_ranges_fail(self):
        msg = error_of(", ".join(_ranges(129)))
        assert "allowlist has 129 ranges; Salesforce allows at most 128 (1 too many)" in msg
        assert "SIDECAR_ALLOWLIST" in msg

    def test_130_ranges_fail(self):
        assert "(2 too many)" in error_of(", ".join(_ranges(130)))

    def test_256_addresses_ok(self):
        a = parse_allowlist("\n".join(_singles(MAX_ADDRESSES)))
        assert a.counts == (0, 256)

    def test_257_addresses_fail(self):
        msg = error_of("\n".join(_singles(257)))
        assert (
            "allowlist has 257 single addresses; Salesforce allows at most 256 (1 too many)" in msg
        )

    def test_both_limits_at_once_ok(self):
        a = parse_allowlist(",".join(_ranges(128) + _singles(256)))
        assert a.counts == (128, 256) and len(a) == 384
        assert a.contains("172.16.0.255") and not a.contains("172.16.1.0")

    def test_both_limits_exceeded_reports_both(self):
        msg = error_of(",".join(_ranges(129) + _singles(258)))
        assert "129 ranges" in msg and "(1 too many)" in msg
        assert "258 single addresses" in msg and "(2 too many)" in msg

    def test_slash_32_counts_as_address_not_range(self):
        a = parse_allowlist(",".join(_ranges(128) + [f"{ip}/32" for ip in _singles(256)]))
        assert a.counts == (128, 256)

    def test_duplicates_count(self):
        msg = error_of(",".join(["203.0.113.7"] * 257))
        assert "257 single addresses" in msg
        parse_allowlist(",".join(["10.0.0.0/24"] * 128))
        assert "129 ranges" in error_of(",".join(["10.0.0.0/24"] * 129))

    def test_contains_is_fast_at_the_limit(self):
        import time

        a = parse_allowlist(",".join(_ranges(128) + _singles(256)))
        t0 = time.perf_counter()
        for _ in range(1000):
            a.contains("192.0.2.1")  # worst case: scans every entry
        assert (time.perf_counter() - t0) / 1000 < 0.001  # generous: well under 1 ms


# --------------------------------------------------------------------------- properties


@st.composite
def ip_ranges(draw) -> IPRange:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    top = 2**bits - 1
    start = draw(st.integers(0, top))
    # Mostly small ranges (so the interior can be walked), sometimes huge ones.
    width = draw(st.one_of(st.integers(0, 64), st.integers(0, top)))
    end = min(top, start + width)
    cls = IPv4Address if version == 4 else IPv6Address
    return IPRange(cls(start), cls(end))


@st.composite
def networks(draw):
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(0, bits))
    addr = draw(st.integers(0, 2**bits - 1))
    return ip_network((addr, prefix), strict=False)


class TestProperties:
    @PROPS
    @given(r=ip_ranges(), data=st.data())
    def test_every_ip_inside_is_contained_and_neighbours_are_not(self, r, data):
        a = Allowlist((r,))
        lo, hi = int(r.start), int(r.end)
        cls = type(r.start)
        assert a.contains(r.start) and a.contains(r.end)
        assert a.contains(str(r.start)) and a.contains(str(r.end))
        if r.size <= 64:
            for n in range(lo, hi + 1):
                assert a.contains(cls(n))
        for n in data.draw(st.lists(st.integers(lo, hi), max_size=20)):
            assert a.contains(cls(n)) and cls(n) in r
        if lo > 0:
            assert not a.contains(cls(lo - 1)) and cls(lo - 1) not in r
        if hi < 2**r.start.max_prefixlen - 1:
            assert not a.contains(cls(hi + 1)) and cls(hi + 1) not in r

    @PROPS
    @given(r=ip_ranges())
    def test_parse_str_round_trips(self, r):
        a = parse_allowlist(str(r))
        assert a.ranges == (r,)
        assert a.counts == ((0, 1) if r.is_single else (1, 0))

    @PROPS
    @given(rs=st.lists(ip_ranges(), max_size=30), sep=st.sampled_from([",", ", ", "\n", " ,\r\n"]))
    def test_allowlist_str_round_trips(self, rs, sep):
        a = Allowlist(tuple(rs))
        assert parse_allowlist(str(a)) == a
        assert parse_allowlist(sep.join(str(r) for r in rs) + sep) == a

    @PROPS
    @given(net=networks())
    def test_cidr_equals_ipaddress_network_bounds(self, net):
        (r,) = parse_allowlist(str(net)).ranges
        assert r.start == net.network_address
        assert r.end == net.broadcast_address
        assert r.size == net.num_addresses
        assert r.is_single == (net.num_addresses == 1)

    @PROPS
    @given(net=networks(), offset=st.integers(1, 2**128))
    def test_cidr_with_host_bits_suggests_network(self, net, offset):
        assume(net.num_addresses > 1)
        host = net.network_address + (offset % (net.num_addresses - 1) + 1)
        item = f"{host}/{net.prefixlen}"
        msg = error_of(item)
        assert f"did you mean {net}?" in msg

    @PROPS
    @given(text=st.text(max_size=200))
    def test_garbage_text_only_raises_allowlist_error(self, text):
        try:
            parse_allowlist(text)
        except AllowlistError as e:
            assert str(e)

    @PROPS
    @given(
        text=st.lists(
            st.text(alphabet="0123456789abcdefABCDEF:./-%[] \t,\n", max_size=40), max_size=12
        ).map(",".join)
    )
    def test_ip_looking_garbage_only_raises_allowlist_error(self, text):
        try:
            a = parse_allowlist(text)
        except AllowlistError as e:
            assert str(e)
        else:
            n_ranges, n_addrs = a.counts
            assert n_ranges <= MAX_RANGES and n_addrs <= MAX_ADDRESSES

    @PROPS
    @given(
        n_ranges=st.integers(0, MAX_RANGES + 3),
        n_addrs=st.integers(0, MAX_ADDRESSES + 3),
        seed=st.randoms(use_true_random=False),
    )
    def test_counts_never_exceed_limits_when_parse_succeeds(self, n_ranges, n_addrs, seed):
        items = _ranges(n_ranges) + _singles(n_addrs)
        seed.shuffle(items)
        try:
            a = parse_allowlist(",".join(items))
        except AllowlistError as e:
            assert n_ranges > MAX_RANGES or n_addrs > MAX_ADDRESSES
            assert "too many" in str(e)
        else:
            assert a.counts == (n_ranges, n_addrs)
            assert a.counts[0] <= MAX_RANGES and a.counts[1] <= MAX_ADDRESSES

    @PROPS
    @given(rs=st.lists(ip_ranges(), max_size=20), probe=st.integers(0, 2**32 - 1))
    def test_contains_matches_brute_force(self, rs, probe):
        a = Allowlist(tuple(rs))
        ip4 = IPv4Address(probe)
        mapped = IPv6Address((0xFFFF << 32) | probe)
        in_v4 = any(r.version == 4 and r.start <= ip4 <= r.end for r in rs)
        in_v6 = any(r.version == 6 and r.start <= mapped <= r.end for r in rs)
        assert a.contains(ip4) == in_v4
        assert a.contains(mapped) == (in_v4 or in_v6)
        assert a.contains(str(mapped)) == (in_v4 or in_v6)
        assert a.missing([str(ip4)]) == ([] if in_v4 else [str(ip4)])
        assert a.contains(ip4) == any(ip4 in r for r in rs)
        assert a.contains(mapped) == any(mapped in r for r in rs)


def test_module_uses_only_stdlib():
    import ast
    import sys
    from pathlib import Path

    import sidecar.egress.allowlist as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}
