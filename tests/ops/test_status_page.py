"""The status page at `/` of the admin port, as a real browser shows it (headless Chromium).

The classic failure: a QuotaGuard pair (127.0.0.2, 127.0.0.3), a Salesforce whose Refresh Token IP
Allowlist holds only 127.0.0.2, the sidecar in `observe` mode with `SIDECAR_ALLOWLIST=127.0.0.2`, and a
few refresh token redemptions. Chromium (Debian package `chromium`) renders the page; the test reads
the DOM it rendered (--dump-dom) and a screenshot, and checks that an operator sees the pair, which IP
is not allowlisted, the outcome counts per egress IP and the verdict naming the IP to add, and that
the page loads nothing from anywhere but the admin port itself.

Without `chromium` the test is skipped on a developer's machine and FAILS under CI (env CI set).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from tests.harness import SidecarProcess, World, redeem, require_tool, wait_until

GOOD_IP, BAD_IP = "127.0.0.2", "127.0.0.3"
CALLS = 5  # odd, so the two IPs get different counts and a swapped row shows
CHROMIUM_TIMEOUT_S = 60
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian) or set $CHROMIUM"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Loopback only: every name resolves to nothing, so even Chromium's own background requests
    # cannot leave the machine (the page is reached by IP).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def require_chromium() -> str:
    """The chromium binary ($CHROMIUM or PATH), or skip (developer machine) / fail (CI)."""
    return require_tool(("chromium", "chromium-browser", "google-chrome"), "CHROMIUM", INSTALL_HINT)


def run_chromium(binary: str, workdir: Path, url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with its own profile, bounded by CHROMIUM_TIMEOUT_S.

    Chromium starts helper processes (zygote, renderer, GPU/network services): it runs in its own
    process group so that a hung run is killed whole.
    """
    profile = workdir / f"profile-{len(list(workdir.glob('profile-*')))}"
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S}s: {err[-2000:]}")
    finally:
        if proc.poll() is None:  # pragma: no cover - communicate() returned, so it has exited
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- reading the rendered DOM -------------------------------------------------------------------

URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "data", "poster", "background", "manifest",
             "xlink:href", "ping", "cite"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: list[str] = field(default_factory=list)
    children: list[Element] = field(default_factory=list)

    def all_text(self) -> str:
        return " ".join(" ".join(self.text + [c.all_text() for c in self.children]).split())

    def iter(self) -> Any:
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Element]:
        return [e for e in self.iter() if e.tag == tag and all(
            (k == "class_" and v in e.attrs.get("class", "").split()) or e.attrs.get(k) == v
            for k, v in attrs.items())]

    def by_id(self, id_: str) -> Element:
        found = [e for e in self.iter() if e.attrs.get("id") == id_]
        assert len(found) == 1, f"expected one element with id={id_!r}, found {len(found)}"
        return found[0]


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class DomParser(HTMLParser):
    """A small tree builder: enough for a page we wrote ourselves and Chromium re-serialized."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute or "css", value)
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        for k, v in el.attrs.items():
            if k in URL_ATTRS:
                values = [p.strip().split(" ")[0] for p in v.split(",")] if k == "srcset" else [v]
                self.urls += [(tag, k, u) for u in values if u]
            elif k == "style":
                self.urls += [(tag, "css", u) for u in css_urls(v)]
            elif k == "content" and tag == "meta" and el.attrs.get("http-equiv", "").lower() == "refresh":
                m = re.search(r"url\s*=\s*(\S+)", v, re.IGNORECASE)
                if m:
                    self.urls.append((tag, "refresh", m.group(1).strip("'\"")))
        if tag not in VOID:
            self.stack.append(el)
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                break
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += [("style", "css", u) for u in css_urls(data)]
        else:
            self.stack[-1].text.append(data)


def css_urls(css: str) -> list[str]:
    found = re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", css, re.IGNORECASE)
    found += re.findall(r"@import\s+['\"]([^'\"]+)['\"]", css, re.IGNORECASE)
    return found


def same_origin(url: str, origin: str) -> bool:
    """True for a URL on ``origin`` or one that fetches nothing from the network (data:, #fragment)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "about", "javascript"):
        return parts.scheme != "javascript"
    return f"{parts.scheme}://{parts.netloc}" == origin


def parse_dom(text: str) -> DomParser:
    parser = DomParser()
    parser.feed(text)
    parser.close()
    return parser


def cells(row: Element) -> list[str]:
    return [c.all_text() for c in row.children if c.tag in ("td", "th")]


# --- reading Chromium's net log and the screenshot ---------------------------------------------

def page_requests(netlog: Path, origin: str) -> list[str]:
    """URLs the page itself requested: the main frame and every request it initiated.

    Chromium's own background requests (update checks, account lookups) carry no page initiator and
    are left out; they cannot leave the machine anyway (--host-resolver-rules).
    """
    data = json.loads(netlog.read_text(encoding="utf-8", errors="replace"))
    names = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    urls = []
    for ev in data["events"]:
        params = ev.get("params") or {}
        from_page = params.get("request_type") == "main frame" or params.get("initiator") == origin
        if names.get(ev["type"]) == "URL_REQUEST_START_JOB" and "url" in params and from_page:
            urls.append(params["url"])
    return urls


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit non-interlaced truecolor PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unexpected PNG format {header}"
    bpp = 3 if color == 2 else 4
    raw, stride, rows = zlib.decompress(idat), width * bpp, []
    prev = bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def rgb_counts(width: int, rows: list[bytes], bpp: int) -> Counter[tuple[int, int, int]]:
    counts: Counter[tuple[int, int, int]] = Counter()
    for r in rows:
        for x in range(0, width * bpp, bpp):
            counts[(r[x], r[x + 1], r[x + 2])] += 1
    return counts


# --- the test -----------------------------------------------------------------------------------

@pytest.fixture
def chromium() -> str:
    return require_chromium()


def test_status_page_in_headless_chromium(
    chromium: str, world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": GOOD_IP, "SIDECAR_GUARD": "observe"})
    assert wait_until(sc.egress_discovered, timeout=10), sc.status()
    world.salesforce.reset_seen()
    token = world.salesforce.issue_refresh_token()
    with sc.session() as s:
        for _ in range(CALLS):
            resp = redeem(s, token)
            if resp.status_code == 200:
                token = resp.json()["refresh_token"]
    # What Salesforce saw is the truth the page must show.
    seen = Counter((r.source_ip, r.status) for r in world.salesforce.seen if r.path == "/services/oauth2/token")
    assert set(seen) == {(GOOD_IP, 200), (BAD_IP, 400)} and sum(seen.values()) == CALLS, seen
    n_ok, n_restricted = seen[(GOOD_IP, 200)], seen[(BAD_IP, 400)]
    assert n_ok != n_restricted

    origin = sc.admin_url
    page_url = origin + "/"
    netlog = tmp_path / "netlog.json"
    dumped = run_chromium(chromium, tmp_path, page_url, "--dump-dom", f"--log-net-log={netlog}")
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    dom = parse_dom(dumped.stdout)
    root = dom.root
    body = root.find_all("body")
    assert body, f"chromium rendered no body:\n{dumped.stdout[:2000]}\n{dumped.stderr[-2000:]}"
    page_text = body[0].all_text()

    # The pair: both members, each with its egress IP, allowlisted and up states.
    members = {r.attrs["data-egress"]: r for r in root.by_id("pair").find_all("tr", class_="member")}
    assert set(members) == {GOOD_IP, BAD_IP}, page_text
    assert {r.attrs["data-member"] for r in members.values()} == set(world.members)

    def state(ip: str, column: str) -> str:
        (cell,) = members[ip].find_all("td", class_=column)
        return cell.all_text()

    # What Salesforce said beside what was typed: the refused IP says so, the allowlisted one says yes.
    assert (state(GOOD_IP, "salesforce"), state(GOOD_IP, "allowlisted"), state(GOOD_IP, "up")) == ("yes", "listed", "yes")
    assert (state(BAD_IP, "salesforce"), state(BAD_IP, "allowlisted"), state(BAD_IP, "up")) == ("refused", "NOT listed", "yes")
    for ip, row in members.items():
        assert ip in cells(row), cells(row)

    # Outcome counts per egress IP since start, with the numbers Salesforce saw.
    outcomes = {r.attrs["data-egress"]: r for r in root.by_id("outcomes").find_all("tr", class_="outcomes")}
    assert set(outcomes) == {GOOD_IP, BAD_IP}, root.by_id("outcomes").all_text()

    def counts(ip: str) -> dict[str, int]:
        """Non-zero outcome counts of one egress IP's row, read under the table's column headings."""
        found = {}
        for cell in outcomes[ip].find_all("td"):
            if "data-outcome" in cell.attrs and int(cell.all_text()):
                found[cell.attrs["data-outcome"]] = int(cell.all_text())
        return found

    table = root.by_id("outcomes")
    heads = [h.all_text() for h in table.find_all("th")]
    assert {"egress IP", "success", "ip_restricted"} <= set(heads), heads
    assert counts(GOOD_IP) == {"success": n_ok}, cells(outcomes[GOOD_IP])
    assert counts(BAD_IP) == {"ip_restricted": n_restricted}, cells(outcomes[BAD_IP])
    for ip, row in outcomes.items():  # the numbers sit under their headings, not just anywhere in the row
        by_heading = dict(zip(heads, cells(row), strict=True))
        assert by_heading["egress IP"] == ip
        assert by_heading["success"] == str(n_ok if ip == GOOD_IP else 0)
        assert by_heading["ip_restricted"] == str(n_restricted if ip == BAD_IP else 0)

    # The verdict, in plain words, names the IP to add.
    verdict = root.by_id("verdict")
    assert verdict.attrs.get("data-level") == "critical"
    words = verdict.all_text()
    assert f"Salesforce refused egress IP {BAD_IP} for app 3MVG9demo" in words, words
    assert "redemptions through that IP fail" in words, words
    assert "External Client App Manager" in words, words
    assert GOOD_IP not in words.replace(BAD_IP, ""), f"the verdict blames the allowlisted IP too: {words}"
    # What Salesforce answered, per app and egress IP: the refused one is flagged.
    answered = {row.attrs["data-egress"]: row for row in root.by_id("evidence").find_all("tr")
                if "data-egress" in row.attrs}
    assert "refused" in answered[BAD_IP].all_text() and "flagged" in answered[BAD_IP].attrs.get("class", "")
    assert "allowed" in answered[GOOD_IP].all_text() and "flagged" not in answered[GOOD_IP].attrs.get("class", "")

    # Recent calls show when they were made.
    times = [r.find_all("td", class_="time")[0].all_text() for r in root.by_id("recent").find_all("tr", class_="call")]
    assert len(times) == CALLS and all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in times), times

    # Self-contained: nothing in the DOM points at another origin, and the page requested nothing else.
    assert not root.find_all("script"), "the page needs no script"
    external = [(tag, attr, u) for tag, attr, u in dom.urls if not same_origin(urljoin(page_url, u), origin)]
    assert external == [], f"external references in the status page: {external}"
    assert dom.urls, "the DOM walk found no links at all (the page links /metrics and /status)"
    requested = page_requests(netlog, origin)
    assert page_url in requested, requested
    assert [u for u in requested if not u.startswith(origin + "/")] == [], requested

    # The screenshot: the page as a person sees it, at 1200x900, with the critical verdict's color.
    png = tmp_path / "page.png"
    shot = run_chromium(chromium, tmp_path, page_url, f"--screenshot={png}", "--window-size=1200,900")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-3000:]
    assert png.stat().st_size > 10_000, f"suspiciously small screenshot: {png.stat().st_size} bytes"
    width, height, rows = png_pixels(png)
    assert (width, height) == (1200, 900)
    bpp = len(rows[0]) // width
    colors = rgb_counts(width, rows, bpp)
    _, n_background = colors.most_common(1)[0]
    assert n_background < 0.97 * width * height, "the screenshot is (almost) blank"
    assert len(colors) > 20, f"only {len(colors)} colors: nothing rendered"
    critical = (0xB0, 0x00, 0x20)
    assert colors[critical] > 100, "the critical verdict's red is not on screen"


def test_render_page_without_a_browser_edge_cases() -> None:
    # Direct-mode-like and blocked states the browser test does not reach: unknown egress, a member
    # down, blocked calls (egress "none"), outcomes beyond the classic two, and text needing escaping.
    from sidecar.ops.status import render_page

    status = {
        "version": "0.0.0", "mode": "pair", "guard": "enforce", "route": "token", "ready": False,
        "uptime_seconds": 3725.0, "allowlist": "<script>alert(1)</script>",
        "verdict": {"level": "critical", "lines": ["Pair member 10.0.0.6:9293 is unreachable (<refused>)."]},
        "pair": [
            {"member": "10.0.0.5:9293", "egress_ip": "52.1.2.3", "up": True, "stable": True, "allowlisted": True,
             "last_probe_age_seconds": 4.2, "last_error": None},
            {"member": "10.0.0.6:9293", "egress_ip": None, "up": False, "stable": None, "allowlisted": False,
             "last_probe_age_seconds": None, "last_error": "connection <refused>"},
        ],
        "outcomes_by_egress_ip": {"52.1.2.3": {"success": 7, "upstream_error": 1}, "none": {"blocked": 2}},
        "recent": [{"grant_type": "refresh_token", "member": "none", "egress_ip": "none", "outcome": "blocked",
                    "status": 503, "duration_ms": None}],
        "orgs": {"total": 51, "attention": 1, "page": 2, "pages": 2, "per_page": 50, "grants_without_org": 3,
                 "rows": [{"org": "00D000000000001EAA", "apps": ["<script>alert(2)</script>"],
                           "egress_ips": {"52.1.2.3": {"success": 2, "ip_restricted": 1}}, "calls": 3, "refusals": 1,
                           "refused_ips": [], "grants": 2, "grants_expiring": 0, "grants_expired": 1, "expiry": "10d",
                           "idle_warning": "1 grant(s) past the org's refresh token expiry (10d)",
                           "last_redemption": None, "attention": True}]},
    }
    dom = parse_dom(render_page(status))
    root = dom.root
    assert not root.find_all("script"), "status text must be escaped, never markup"
    assert "<script>alert(1)</script>" in root.by_id("allowlist").all_text()
    (down,) = [r for r in root.by_id("pair").find_all("tr", class_="member") if r.attrs["data-member"] == "10.0.0.6:9293"]
    assert [c.all_text() for c in down.find_all("td", class_="up")] == ["NO"]
    assert "connection <refused>" in down.all_text()
    heads = [h.all_text() for h in root.by_id("outcomes").find_all("th")]
    assert heads[-4:] == ["success", "ip_restricted", "upstream_error", "blocked"], heads
    rows = {r.attrs["data-egress"]: dict(zip(heads, cells(r), strict=True))
            for r in root.by_id("outcomes").find_all("tr", class_="outcomes")}
    assert rows["52.1.2.3"]["calls"] == "8" and rows["52.1.2.3"]["failed"] == "12 %"
    assert rows["none"]["blocked"] == "2" and rows["none"]["egress IP"].startswith("none (blocked")
    assert root.by_id("verdict").attrs["data-level"] == "critical"
    (org,) = root.by_id("orgs").find_all("tr", class_="org")
    assert "<script>alert(2)</script>" in org.all_text() and "flagged" in org.attrs["class"]
    assert [c.all_text() for c in org.find_all("td", class_="grants")] == ["2 (1 expired)"]
    assert "52.1.2.3: 2 success, 1 ip_restricted" in org.all_text() and "not since start" in org.all_text()
    pager = root.by_id("orgs-pager")
    assert "Orgs 51–51 of 51 (page 2 of 2" in pager.all_text() and [a.attrs["href"] for a in pager.find_all("a")] == \
        ["/?orgs_page=1"]
    assert "3 tracked grant(s) belong to an org no answer has named yet" in root.all_text()
    assert all(same_origin(urljoin("http://x/", u), "http://x") for _, _, u in dom.urls), dom.urls


ORGS = 500


def test_the_per_org_table_of_500_orgs_is_paged_in_headless_chromium(
    chromium: str, world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    """An ISV's app with 500 customer orgs, each redeeming once through the real sidecar; the last org restricts
    127.0.0.3 itself (its refusal is retried through 127.0.0.2). The page shows 50 orgs at a time, the one that
    needs attention first, each with the egress IP Salesforce saw its redemption come from, and pages on."""
    sf = world.salesforce
    sf.set_allowlist([GOOD_IP, BAD_IP])
    orgs = [sf.add_org() for _ in range(ORGS - 1)] + [sf.add_org(ip_ranges=[GOOD_IP])]
    sc = make_sidecar_proc(world.pair_env())
    assert wait_until(sc.egress_discovered, timeout=10), sc.status()
    sf.reset_seen()
    with sc.session() as s:
        for org in orgs[:-1]:
            assert redeem(s, sf.issue_refresh_token(org)).status_code == 200
        token = sf.issue_refresh_token(orgs[-1])
        for _ in range(4):  # round-robin: within two redemptions one goes through .3, is refused and retried
            resp = redeem(s, token)
            assert resp.status_code == 200, resp.text
            token = resp.json()["refresh_token"]
            if any(r.org_id == orgs[-1] and r.status == 400 for r in sf.seen):
                break
    seen: dict[str, list[tuple[str, int | None]]] = {}
    for r in sf.seen:
        if r.path == "/services/oauth2/token":
            seen.setdefault(r.org_id, []).append((r.source_ip, r.status))
    assert set(seen) == set(orgs) and (BAD_IP, 400) in seen[orgs[-1]], seen[orgs[-1]]
    assert wait_until(lambda: sc.status()["orgs"]["total"] == ORGS, timeout=10)

    def rows_of(url: str) -> tuple[list[Element], Element]:
        dumped = run_chromium(chromium, tmp_path, url, "--dump-dom")
        assert dumped.returncode == 0, dumped.stderr[-3000:]
        root = parse_dom(dumped.stdout).root
        return root.by_id("orgs").find_all("tr", class_="org"), root.by_id("orgs-pager")

    first, pager = rows_of(sc.admin_url + "/")
    assert len(first) == 50 and (pager.attrs["data-page"], pager.attrs["data-pages"], pager.attrs["data-total"]) == (
        "1", "10", str(ORGS))
    assert "Orgs 1–50 of 500 (page 1 of 10; 1 need attention" in pager.all_text()
    assert [a.attrs["href"] for a in pager.find_all("a")] == ["/?orgs_page=2"]
    restricted = first[0]  # the org that needs attention comes first, flagged, its refusal counted
    assert restricted.attrs["data-org"] == orgs[-1] and "flagged" in restricted.attrs["class"]
    cells_of = {r.attrs["data-org"]: r for r in first}
    for org, row in cells_of.items():  # each org with the egress IPs Salesforce saw, and its counts
        ips = row.find_all("td", class_="ips")[0].all_text()
        for ip, status in seen[org]:
            assert f"{ip}: " in ips, (org, ips, seen[org])
        assert row.find_all("td", class_="refusals")[0].all_text() == str(sum(1 for _, st in seen[org] if st == 400))
    last, pager = rows_of(sc.admin_url + "/?orgs_page=10")
    assert len(last) == 50 and pager.attrs["data-page"] == "10"
    assert [a.attrs["href"] for a in pager.find_all("a")] == ["/?orgs_page=9"]
    assert not {r.attrs["data-org"] for r in last} & set(cells_of)
    # /status pages the same table; every org is on exactly one page.
    on_pages: list[str] = []
    for page in range(1, 11):
        with urllib.request.urlopen(f"{sc.admin_url}/status?orgs_page={page}", timeout=10) as resp:
            table = json.loads(resp.read())["orgs"]
        assert table["page"] == page and len(table["rows"]) == 50
        on_pages += [r["org"] for r in table["rows"]]
    assert sorted(on_pages) == sorted(orgs)
    with urllib.request.urlopen(f"{sc.admin_url}/status?orgs_page=99", timeout=10) as resp:
        assert json.loads(resp.read())["orgs"]["page"] == 10  # past the last: the last
