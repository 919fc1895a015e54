"""``pvio status``: read the store as an ordinary (admin) client and summarise it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pvio.layouts import XenbusState
from pvio.xenbus.client import XsClient
from pvio.xenbus.state import parse_state
from pvio.xenbus.store import XenstoreError


@dataclass
class DeviceRow:
    type: str
    domid: int
    devid: str
    backend_state: str
    frontend_state: str
    features: dict[str, str] = field(default_factory=dict)
    frontend_keys: dict[str, str] = field(default_factory=dict)
    statistics: dict[str, str] = field(default_factory=dict)


def _text(raw: bytes | None) -> str:
    """A store value for an operator's terminal. Guests write most of these
    keys: bytes that are not UTF-8 or not printable (escape sequences) are shown
    escaped, never passed through."""
    text = (raw or b"").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


async def _ls(xs: XsClient, path: str) -> list[str]:
    try:
        return await xs.directory(path)
    except XenstoreError:
        return []


async def _state(xs: XsClient, path: str) -> str:
    state = parse_state(await xs.read_or_none(f"{path}/state"))
    return f"{state.name}({int(state)})" if state != XenbusState.Unknown else "-"


async def collect(xs: XsClient) -> tuple[list[dict], list[DeviceRow]]:
    domains = []
    for domid in sorted(await _ls(xs, "/local/domain"), key=lambda d: int(d) if d.isdigit()
                        else 1 << 30):
        name = await xs.read_or_none(f"/local/domain/{domid}/name")
        domains.append({"domid": domid, "name": _text(name)})
    rows = []
    base = "/local/domain/0/backend"
    for type_ in await _ls(xs, base):
        for domid in await _ls(xs, f"{base}/{type_}"):
            for devid in await _ls(xs, f"{base}/{type_}/{domid}"):
                be = f"{base}/{type_}/{domid}/{devid}"
                fe = _text(await xs.read_or_none(f"{be}/frontend"))
                row = DeviceRow(type_, int(domid), devid, await _state(xs, be),
                                await _state(xs, fe) if fe else "-")
                for key in await _ls(xs, be):
                    if key.startswith(("feature-", "max-", "multi-queue")) or key in (
                        "sectors", "sector-size", "info", "mode", "mac"
                    ):
                        row.features[key] = _text(await xs.read_or_none(f"{be}/{key}"))
                for key in await _ls(xs, f"{be}/statistics"):
                    row.statistics[key] = _text(await xs.read_or_none(f"{be}/statistics/{key}"))
                if fe:
                    for key in await _ls(xs, fe):
                        if key.startswith(("ring-ref", "event-channel", "protocol", "port",
                                           "tx-ring", "rx-ring", "ring-page-order",
                                           "feature-", "request-")):
                            row.frontend_keys[key] = _text(await xs.read_or_none(f"{fe}/{key}"))
                rows.append(row)
    return domains, rows


def render(domains: list[dict], rows: list[DeviceRow]) -> str:
    out = ["DOMAINS"]
    for dom in domains:
        out.append(f"  dom{dom['domid']:<4} {dom['name']}")
    out.append("")
    out.append("DEVICES")
    if not rows:
        out.append("  (none)")
    for row in rows:
        out.append(f"  {row.type}/{row.domid}/{row.devid}: backend {row.backend_state}, "
                   f"frontend {row.frontend_state}")
        if row.features:
            out.append("    backend:  " + ", ".join(f"{k}={v}" for k, v in
                                                    sorted(row.features.items())))
        if row.frontend_keys:
            out.append("    frontend: " + ", ".join(f"{k}={v}" for k, v in
                                                    sorted(row.frontend_keys.items())))
        if row.statistics:
            out.append("    stats:    " + ", ".join(f"{k}={v}" for k, v in
                                                    sorted(row.statistics.items())))
    return "\n".join(out)
