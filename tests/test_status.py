"""`pvio status` shows what guests wrote without letting it reach the terminal raw."""

from pvio import _status
from pvio.frontends.session import open_session
from pvio.xenbus.client import open_client
from tests.pvio_daemon import running_daemon

TOML = """
[[domain]]
name = "guest"
  [[domain.device]]
  type = "console"
  devid = 0
"""


async def test_status_survives_non_utf8_and_escape_sequences_in_guest_keys():
    """Regression: a guest could write non-UTF-8 bytes into its frontend keys and
    crash `pvio status` (UnicodeDecodeError), or escape sequences that went to the
    operator's terminal unfiltered."""
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as session:
        fe = f"/local/domain/{session.domid}/device/console/0"
        await session.xs.write(f"{fe}/protocol", b"\xff\xfe\x1b]0;owned\x07")
        await session.xs.write(f"{fe}/feature-evil", b"\x1b[2J")
        async with open_client(daemon.config.admin_socket) as xs:
            domains, rows = await _status.collect(xs)
        text = _status.render(domains, rows)
        (row,) = [r for r in rows if r.type == "console"]
        assert row.frontend_keys["protocol"] == "\\xff\\xfe\\x1b]0;owned\\x07"
        assert row.frontend_keys["feature-evil"] == "\\x1b[2J"
        assert "\x1b" not in text and "\x07" not in text
