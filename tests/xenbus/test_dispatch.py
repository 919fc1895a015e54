"""Every ``XS_*`` request type through :func:`pvio.xenbus.dispatch.dispatch`.

Good payloads get the reply xs_wire documents; malformed ones an ``XS_ERROR``
with the errno name C xenstored gives; unknown types ``ENOSYS``; the
toolstack's types ``EACCES`` (the pvio daemon is the toolstack). Whatever a
client sends, dispatch answers with a message echoing ``req_id`` and
``tx_id`` and never raises (hardening.md #3, #8, #16).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio.layouts import XSD_ERRORS
from pvio.layouts import XsdSockmsgType as XS
from pvio.xenbus import wire
from pvio.xenbus.dispatch import HANDLERS, TOOLSTACK_ONLY, dispatch
from pvio.xenbus.store import Connection, Store
from pvio.xenbus.wire import Message

REQ_ID = 0xC0FFEE


def make() -> tuple[Store, Connection, Connection, Connection]:
    store = Store()
    for domid in (1, 2):
        store.ensure(f"/local/domain/{domid}", None, [f"n{domid}"])
    dom0 = Connection(0, privileged=True, name="dom0")
    dom1 = Connection(1, name="dom1")
    dom2 = Connection(2, name="dom2")
    store.ensure("/local/domain/1/x", b"value-of-x")
    store.set_perms(dom0, "/local/domain/1/x", ["n1"])
    store.ensure("/tool/a", b"A")
    store.ensure("/tool/b", b"B")
    return store, dom0, dom1, dom2


def call(store, conn, mtype, payload, tx_id=0):
    reply, events = dispatch(store, conn, Message(int(mtype), REQ_ID, tx_id, payload))
    assert isinstance(reply, Message)
    assert reply.req_id == REQ_ID
    assert reply.tx_id == tx_id
    return reply, events


def ok(store, conn, mtype, payload, tx_id=0) -> tuple[bytes, list]:
    reply, events = call(store, conn, mtype, payload, tx_id)
    assert reply.type == int(mtype), f"expected success, got {reply.payload!r}"
    return reply.payload, events


def err(store, conn, mtype, payload, tx_id=0) -> str:
    reply, events = call(store, conn, mtype, payload, tx_id)
    assert reply.type == XS.ERROR, f"expected an error, got {reply.payload!r}"
    assert events == []
    assert reply.payload.endswith(b"\0")
    name = reply.payload[:-1].decode()
    assert name in XSD_ERRORS
    return name


# ------------------------------------------------------------ good payloads


def test_read():
    store, dom0, dom1, _ = make()
    assert ok(store, dom1, XS.READ, b"x\0")[0] == b"value-of-x"
    assert ok(store, dom0, XS.READ, b"/local/domain/1/x\0")[0] == b"value-of-x"


def test_write_value_is_the_unterminated_rest():
    store, dom0, dom1, _ = make()
    payload, _ = ok(store, dom1, XS.WRITE, b"new\0v\0with\0nuls")
    assert payload == b"OK\0"
    assert store.read(dom0, "/local/domain/1/new") == b"v\0with\0nuls"
    ok(store, dom1, XS.WRITE, b"empty\0")
    assert store.read(dom0, "/local/domain/1/empty") == b""


def test_write_returns_the_watch_events():
    store, _, dom1, _ = make()
    watcher = Connection(0, privileged=True)
    store.watch(watcher, "/local/domain/1", "t")
    _, events = ok(store, dom1, XS.WRITE, b"w\0v")
    assert [(e.conn, e.path, e.token) for e in events] == [(watcher, "/local/domain/1/w", "t")]


def test_mkdir_and_rm():
    store, dom0, dom1, _ = make()
    assert ok(store, dom1, XS.MKDIR, b"d/e\0")[0] == b"OK\0"
    assert store.read(dom0, "/local/domain/1/d/e") == b""
    assert ok(store, dom1, XS.RM, b"d\0")[0] == b"OK\0"
    assert err(store, dom0, XS.READ, b"/local/domain/1/d\0") == "ENOENT"


def test_directory():
    store, dom0, _, _ = make()
    assert sorted(wire.strings(ok(store, dom0, XS.DIRECTORY, b"/tool\0")[0])) == ["a", "b"]
    assert ok(store, dom0, XS.DIRECTORY, b"/tool/a\0")[0] == b""


def test_directory_part():
    store, dom0, _, _ = make()
    for i in range(5):
        store.ensure(f"/many/c{i}", b"")
    payload = ok(store, dom0, XS.DIRECTORY_PART, b"/many\0" + b"0\0")[0]
    gen, *children = wire.strings(payload)
    assert gen.isdigit()
    assert children[:-1] == [f"c{i}" for i in range(5)]
    assert children[-1] == ""  # the extra NUL: the list is complete
    payload = ok(store, dom0, XS.DIRECTORY_PART, b"/many\0" + b"3\0")[0]
    assert wire.strings(payload)[1:] == ["c3", "c4", ""]
    payload = ok(store, dom0, XS.DIRECTORY_PART, b"/many\0" + b"99\0")[0]
    assert wire.strings(payload)[1:] == [""]


def test_directory_part_splits_a_large_directory_and_covers_it_all():
    store, dom0, _, _ = make()
    names = [f"child-with-a-long-name-{i:04d}" for i in range(400)]
    for name in names:
        store.ensure(f"/big/{name}", b"")
    got, offset = [], 0
    for _ in range(50):
        payload = ok(store, dom0, XS.DIRECTORY_PART, b"/big\0" + f"{offset}\0".encode())[0]
        assert len(payload) <= 4096
        _gen, *part = wire.strings(payload)
        if part and part[-1] == "":
            got += part[:-1]
            break
        got += part
        offset += len(part)
    assert got == names


def test_directory_too_large_for_one_reply_is_e2big():
    """No reply may exceed XENSTORE_PAYLOAD_MAX: the peer's framer (pvio's own
    MessageReader included) treats a longer one as a framing error and drops
    the connection. C xenstored send_reply(): ``if (len > XENSTORE_PAYLOAD_MAX)
    { send_error(conn, E2BIG); return; }``; XS_DIRECTORY_PART exists for such
    directories."""
    store, _, dom1, _ = make()
    for i in range(300):  # 300 * 19 bytes of names
        ok(store, dom1, XS.WRITE, f"big/child-number-{i:05d}\0".encode())
    reply, _ = call(store, dom1, XS.DIRECTORY, b"big\0")
    assert len(reply.payload) <= 4096, f"a {len(reply.payload)}-byte reply"
    assert reply.type == XS.ERROR and reply.payload == b"E2BIG\0"
    # the same directory is readable in parts
    payload = ok(store, dom1, XS.DIRECTORY_PART, b"big\0" + b"0\0")[0]
    assert len(payload) <= 4096


def test_get_perms_and_set_perms():
    store, dom0, dom1, _ = make()
    assert ok(store, dom1, XS.GET_PERMS, b"x\0")[0] == b"n1\0"
    assert ok(store, dom1, XS.SET_PERMS, b"x\0n1\0r2\0b3\0")[0] == b"OK\0"
    assert ok(store, dom0, XS.GET_PERMS, b"/local/domain/1/x\0")[0] == b"n1\0r2\0b3\0"


def test_watch_unwatch_reset_watches():
    store, _, dom1, _ = make()
    payload, events = ok(store, dom1, XS.WATCH, b"dev\0tok\0")
    assert payload == b"OK\0"
    assert [(e.conn, e.path, e.token) for e in events] == [(dom1, "dev", "tok")]
    assert ok(store, dom1, XS.UNWATCH, b"dev\0tok\0")[0] == b"OK\0"
    assert store.watch_count(dom1) == 0
    ok(store, dom1, XS.WATCH, b"a\0t1\0")
    ok(store, dom1, XS.WATCH, b"@releaseDomain\0t2\0")
    assert ok(store, dom1, XS.RESET_WATCHES, b"")[0] == b"OK\0"
    assert store.watch_count(dom1) == 0


def test_transaction_start_and_end():
    store, dom0, dom1, _ = make()
    payload = ok(store, dom1, XS.TRANSACTION_START, b"\0")[0]
    (tx_text,) = wire.strings(payload, 1)
    tx = int(tx_text)
    assert tx != 0
    ok(store, dom1, XS.WRITE, b"in-tx\0v", tx_id=tx)
    assert err(store, dom1, XS.READ, b"in-tx\0") == "ENOENT"
    assert ok(store, dom1, XS.READ, b"in-tx\0", tx_id=tx)[0] == b"v"
    assert ok(store, dom1, XS.TRANSACTION_END, b"T\0", tx_id=tx)[0] == b"OK\0"
    assert store.read(dom0, "/local/domain/1/in-tx") == b"v"
    tx2 = int(wire.strings(ok(store, dom1, XS.TRANSACTION_START, b"\0")[0], 1)[0])
    ok(store, dom1, XS.WRITE, b"aborted\0v", tx_id=tx2)
    assert ok(store, dom1, XS.TRANSACTION_END, b"F\0", tx_id=tx2)[0] == b"OK\0"
    assert err(store, dom0, XS.READ, b"/local/domain/1/aborted\0") == "ENOENT"


def test_transaction_conflict_is_eagain():
    store, dom0, dom1, _ = make()
    tx = int(wire.strings(ok(store, dom1, XS.TRANSACTION_START, b"\0")[0], 1)[0])
    ok(store, dom1, XS.READ, b"x\0", tx_id=tx)
    ok(store, dom0, XS.WRITE, b"/local/domain/1/x\0changed")
    ok(store, dom1, XS.WRITE, b"y\0v", tx_id=tx)
    assert err(store, dom1, XS.TRANSACTION_END, b"T\0", tx_id=tx) == "EAGAIN"


def test_get_domain_path():
    store, _, dom1, _ = make()
    assert ok(store, dom1, XS.GET_DOMAIN_PATH, b"7\0")[0] == b"/local/domain/7\0"
    assert ok(store, dom1, XS.GET_DOMAIN_PATH, b"0\0")[0] == b"/local/domain/0\0"


def test_control_print_for_dom0():
    store, dom0, _, _ = make()
    assert ok(store, dom0, XS.CONTROL, b"print\0hello\0")[0] == b"OK\0"


# ------------------------------------------------------------- bad payloads

PATH_TYPES = [XS.READ, XS.MKDIR, XS.RM, XS.DIRECTORY, XS.GET_PERMS]

MALFORMED_PATH_PAYLOADS = [
    b"",  # no argument at all
    b"x",  # not NUL-terminated
    b"x\0y\0",  # two arguments
    b"\0",  # empty path
    b"/a b\0",  # a bad character
    b"/a/\0",  # trailing slash
    b"/a//b\0",
    b"/\xff\0",  # not ASCII
    b"/" + b"a" * 3072 + b"\0",  # 3073 bytes
    b"r" * 2049 + b"\0",  # relative, 2049 bytes
]


@pytest.mark.parametrize("mtype", PATH_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("payload", MALFORMED_PATH_PAYLOADS, ids=lambda p: repr(p[:12]))
def test_path_requests_with_malformed_payload_are_einval(mtype, payload):
    store, dom0, dom1, _ = make()
    for conn in (dom0, dom1):
        assert err(store, conn, mtype, payload) == "EINVAL"


@pytest.mark.parametrize("mtype", [XS.READ, XS.DIRECTORY, XS.GET_PERMS], ids=lambda t: t.name)
def test_path_requests_errno_for_missing_and_forbidden(mtype):
    store, _, dom1, dom2 = make()
    assert err(store, dom1, mtype, b"nope\0") == "ENOENT"
    assert err(store, dom2, mtype, b"/local/domain/1/x\0") == "EACCES"
    assert err(store, dom2, mtype, b"/local/domain/1/nope\0") == "EACCES"


@pytest.mark.parametrize(
    "mtype", [XS.READ, XS.WRITE, XS.MKDIR, XS.RM, XS.DIRECTORY, XS.DIRECTORY_PART,
              XS.GET_PERMS, XS.SET_PERMS], ids=lambda t: t.name,
)
def test_unknown_transaction_id_is_enoent(mtype):
    store, _, dom1, dom2 = make()
    payloads = {XS.WRITE: b"x\0v", XS.DIRECTORY_PART: b"x\0" + b"0\0",
                XS.SET_PERMS: b"x\0n1\0"}
    payload = payloads.get(mtype, b"x\0")
    assert err(store, dom1, mtype, payload, tx_id=4242) == "ENOENT"
    tx = store.transaction_start(dom2)  # another connection's transaction
    assert err(store, dom1, mtype, payload, tx_id=tx) == "ENOENT"


@pytest.mark.parametrize(
    ("payload", "errno"),
    [
        (b"", "EINVAL"),
        (b"no-nul-anywhere", "EINVAL"),
        (b"\0value", "EINVAL"),
        (b"/a b\0value", "EINVAL"),
        (b"\xff\0value", "EINVAL"),
        (b"/local/domain/2/x\0value", "EACCES"),
        (b"big\0" + b"v" * 4097, "E2BIG"),
    ],
)
def test_write_errors(payload, errno):
    store, _, dom1, _ = make()
    assert err(store, dom1, XS.WRITE, payload) == errno


def test_rm_errors():
    store, dom0, _, dom2 = make()
    assert err(store, dom0, XS.RM, b"/\0") == "EINVAL"
    assert err(store, dom0, XS.RM, b"/no/such\0") == "ENOENT"
    assert err(store, dom2, XS.RM, b"/local/domain/1/x\0") == "EACCES"


@pytest.mark.parametrize(
    "payload", [b"/tool\0", b"/tool\0x\0", b"/tool\0-1\0", b"/tool\0\0", b"/tool\0 1\0",
                b"/tool\x000\0extra\0", b"/tool\x000"],
)
def test_directory_part_errors(payload):
    store, dom0, _, _ = make()
    assert err(store, dom0, XS.DIRECTORY_PART, payload) == "EINVAL"


def test_directory_part_missing_and_forbidden():
    store, dom0, _, dom2 = make()
    assert err(store, dom0, XS.DIRECTORY_PART, b"/nope\0" + b"0\0") == "ENOENT"
    assert err(store, dom2, XS.DIRECTORY_PART, b"/local/domain/1\0" + b"0\0") == "EACCES"


@pytest.mark.parametrize(
    ("payload", "errno"),
    [
        (b"x\0", "EINVAL"),  # no permission at all
        (b"x\0q1\0", "EINVAL"),
        (b"x\0r\0", "EINVAL"),
        (b"x\0r1", "EINVAL"),  # not NUL-terminated
        (b"x\0r99999\0", "EINVAL"),
        (b"x\0r1\0\0", "EINVAL"),
        (b"nope\0n1\0", "ENOENT"),
    ],
)
def test_set_perms_errors(payload, errno):
    store, _, dom1, _ = make()
    assert err(store, dom1, XS.SET_PERMS, payload) == errno


def test_set_perms_by_a_non_owner_is_eacces():
    store, _, dom1, dom2 = make()
    store.set_perms(dom1, "/local/domain/1/x", ["n1", "b2"])
    assert err(store, dom2, XS.SET_PERMS, b"/local/domain/1/x\0n2\0") == "EACCES"


@pytest.mark.parametrize("mtype", [XS.WATCH, XS.UNWATCH], ids=lambda t: t.name)
@pytest.mark.parametrize(
    "payload", [b"", b"dev\0", b"dev\0tok", b"dev\0tok\0extra\0", b"\0tok\0", b"/a b\0tok\0",
                b"dev\0\xff\0"],
)
def test_watch_and_unwatch_malformed_are_einval(mtype, payload):
    store, _, dom1, _ = make()
    assert err(store, dom1, mtype, payload) == "EINVAL"


def test_watch_duplicate_is_eexist_and_unknown_unwatch_is_enoent():
    store, _, dom1, _ = make()
    ok(store, dom1, XS.WATCH, b"dev\0tok\0")
    assert err(store, dom1, XS.WATCH, b"dev\0tok\0") == "EEXIST"
    assert err(store, dom1, XS.UNWATCH, b"dev\0other\0") == "ENOENT"


def test_watch_quota_is_e2big():
    store, _, dom1, _ = make()
    for i in range(store.quota.watches):
        ok(store, dom1, XS.WATCH, f"w{i}\0t\0".encode())
    assert err(store, dom1, XS.WATCH, b"one-more\0t\0") == "E2BIG"


def test_transaction_start_errors():
    store, _, dom1, _ = make()
    tx = int(wire.strings(ok(store, dom1, XS.TRANSACTION_START, b"\0")[0], 1)[0])
    assert err(store, dom1, XS.TRANSACTION_START, b"\0", tx_id=tx) == "EBUSY"  # nested
    for _ in range(store.quota.transactions - 1):
        ok(store, dom1, XS.TRANSACTION_START, b"\0")
    assert err(store, dom1, XS.TRANSACTION_START, b"\0") == "ENOSPC"


@pytest.mark.parametrize("payload", [b"", b"T", b"X\0", b"TT\0", b"T\0F\0", b"t\0", b"\0"])
def test_transaction_end_malformed_is_einval(payload):
    store, _, dom1, _ = make()
    tx = store.transaction_start(dom1)
    assert err(store, dom1, XS.TRANSACTION_END, payload, tx_id=tx) == "EINVAL"


def test_transaction_end_of_unknown_transaction_is_enoent():
    store, _, dom1, _ = make()
    assert err(store, dom1, XS.TRANSACTION_END, b"T\0", tx_id=31337) == "ENOENT"


def test_transaction_end_without_a_transaction_is_enoent():
    """C xenstored do_transaction_end(): ``if ((trans = conn->transaction) ==
    NULL) return ENOENT;`` (after checking the T/F argument)."""
    store, _, dom1, _ = make()
    assert err(store, dom1, XS.TRANSACTION_END, b"T\0", tx_id=0) == "ENOENT"


@pytest.mark.parametrize("payload", [b"", b"\0", b"abc\0", b"-1\0", b"65536\0", b"1", b"1\0x\0"])
def test_get_domain_path_malformed_is_einval(payload):
    store, _, dom1, _ = make()
    assert err(store, dom1, XS.GET_DOMAIN_PATH, payload) == "EINVAL"


def test_control_is_dom0_only():
    store, dom0, dom1, _ = make()
    assert err(store, dom1, XS.CONTROL, b"print\0hello\0") == "EACCES"
    assert err(store, dom0, XS.CONTROL, b"no-such-command\0") == "EINVAL"
    assert err(store, dom0, XS.CONTROL, b"print") == "EINVAL"


# ------------------------------------------------- toolstack and unknown types


@pytest.mark.parametrize("mtype", sorted(TOOLSTACK_ONLY), ids=lambda t: XS(t).name)
def test_toolstack_types_are_eacces(mtype):
    store, dom0, dom1, _ = make()
    for conn in (dom0, dom1):
        assert err(store, conn, mtype, b"1\0") == "EACCES"
        assert err(store, conn, mtype, b"") == "EACCES"


UNKNOWN_TYPES = [
    XS.WATCH_EVENT,
    XS.ERROR,
    XS.TYPE_COUNT,
    XS.INVALID,
    20,  # removed from xs_wire.h
    24,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    wire.PVIO_SHARE_MEMORY,  # the server handles these before dispatch
    wire.PVIO_BIND_EVTCHN,
    wire.PVIO_CLAIM,
]


@pytest.mark.parametrize("mtype", UNKNOWN_TYPES, ids=hex)
def test_unknown_types_are_enosys(mtype):
    store, dom0, dom1, _ = make()
    for conn in (dom0, dom1):
        assert err(store, conn, mtype, b"/a\0") == "ENOSYS"
        assert err(store, conn, mtype, b"") == "ENOSYS"


GOOD_REQUESTS = {
    XS.CONTROL: b"print\0x\0",
    XS.DIRECTORY: b"/tool\0",
    XS.READ: b"/tool/a\0",
    XS.GET_PERMS: b"/tool/a\0",
    XS.WATCH: b"/tool\0t\0",
    XS.UNWATCH: b"/tool\0t\0",
    XS.TRANSACTION_START: b"\0",
    XS.GET_DOMAIN_PATH: b"3\0",
    XS.WRITE: b"/tool/c\0v",
    XS.MKDIR: b"/tool/d\0",
    XS.RM: b"/tool/d\0",
    XS.SET_PERMS: b"/tool/a\0r0\0",
    XS.RESET_WATCHES: b"",
    XS.DIRECTORY_PART: b"/tool\x000\0",
}


def test_every_xs_type_is_covered_here():
    """Each xs_wire type is either answered (a handler, exercised above) or
    refused with a known errno: a new type must come with a test."""
    refused = set(TOOLSTACK_ONLY) | {int(t) for t in UNKNOWN_TYPES}
    for t in XS:
        assert (t in HANDLERS) != (t in refused), t
    assert set(HANDLERS) - {XS.TRANSACTION_END} == set(GOOD_REQUESTS)


@pytest.mark.parametrize("mtype", list(GOOD_REQUESTS), ids=lambda t: t.name)
def test_every_handled_type_answers_a_good_request_in_kind(mtype):
    store, dom0, _, _ = make()
    if mtype == XS.UNWATCH:
        store.watch(dom0, "/tool", "t")
    payload, _ = ok(store, dom0, mtype, GOOD_REQUESTS[mtype])
    assert isinstance(payload, bytes)


# -------------------------------------------------------------- never raises

_fragments = st.sampled_from(
    [b"", b"\0", b"/", b"/tool", b"/tool/a", b"x", b"dev", b"/local/domain/1", b"@releaseDomain",
     b"T", b"F", b"0", b"1", b"-1", b"4294967295", b"n1", b"r0", b"b2", b"zz", b"//", b"\xff",
     b"\n", b" ", b"/a/", b"a" * 100, b"9" * 50, b"@introduceDomain", b"print"]
)
_payloads = st.one_of(
    st.lists(_fragments, max_size=6).map(b"".join),
    st.binary(max_size=64),
)
_types = st.one_of(st.sampled_from([int(t) for t in XS] + [20, 24, wire.PVIO_CLAIM]),
                   st.integers(0, 0xFFFFFFFF))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2), _types, _payloads, st.integers(0, 6),
                  st.integers(0, 0xFFFFFFFF)),
        min_size=1,
        max_size=12,
    )
)
def test_dispatch_never_raises_and_always_answers(steps):
    store, dom0, dom1, dom2 = make()
    conns = (dom0, dom1, dom2)
    for who, mtype, payload, tx_id, req_id in steps:
        msg = Message(mtype, req_id, tx_id, payload)
        reply, events = dispatch(store, conns[who], msg)
        assert reply.req_id == req_id and reply.tx_id == tx_id
        assert len(reply.payload) <= 4096
        if reply.type == XS.ERROR:
            assert reply.payload.endswith(b"\0")
            assert reply.payload[:-1].decode() in XSD_ERRORS
            assert events == []
        else:
            assert reply.type == mtype
        for event in events:
            assert event.conn in conns
