"""Sans-I/O semantics of :mod:`pvio.xenbus.store`, checked against C xenstored.

The reference is C xenstored (tools/xenstored) and docs/misc/xenstore.txt:
node creation and removal, path syntax and length limits, the permission
model (owner + default + per-domain entries, dom0 privileged), watches (fire
on registration, on changes of the path or a descendant, on removal of an
ancestor, filtered by read permission), transactions (isolation, EAGAIN on
conflict with nothing applied) and per-domain quotas (hardening.md #15).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest

from pvio.layouts import XENSTORE_ABS_PATH_MAX, XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX
from pvio.xenbus.store import Connection, Perm, Quota, Store, XenstoreError

DOMIDS = (1, 2, 3)


def make_store(quota: Quota | None = None) -> Store:
    """A store with homes /local/domain/{1,2,3}, each owned by its domain and
    unreadable to everyone else (what pvio's server sets up per guest)."""
    store = Store(quota)
    for domid in DOMIDS:
        store.ensure(f"/local/domain/{domid}", None, [f"n{domid}"])
    return store


@pytest.fixture
def store() -> Store:
    return make_store()


@pytest.fixture
def dom0() -> Connection:
    return Connection(0, privileged=True, name="dom0")


@pytest.fixture
def dom1() -> Connection:
    return Connection(1, name="dom1")


@pytest.fixture
def dom2() -> Connection:
    return Connection(2, name="dom2")


@pytest.fixture
def dom3() -> Connection:
    return Connection(3, name="dom3")


def errname(fn, *args, **kwargs) -> str:
    with pytest.raises(XenstoreError) as info:
        fn(*args, **kwargs)
    return info.value.name


def seen(events, conn) -> list[tuple[str, str]]:
    """(path, token) of the events addressed to ``conn``, in order."""
    return [(e.path, e.token) for e in events if e.conn is conn]


def perms(store: Store, conn: Connection, path: str) -> list[str]:
    return [str(p) for p in store.get_perms(conn, path)]


# ------------------------------------------------------------------ basics


def test_write_then_read_returns_the_exact_bytes(store, dom0):
    value = bytes(range(256)) + b"\0tail"
    store.write(dom0, "/tool/blob", value)
    assert store.read(dom0, "/tool/blob") == value


def test_overwrite_replaces_the_value(store, dom1):
    store.write(dom1, "x", b"one")
    store.write(dom1, "x", b"two")
    assert store.read(dom1, "x") == b"two"


def test_write_creates_missing_parents_empty(store, dom0):
    store.write(dom0, "/a/b/c", b"leaf")
    assert store.read(dom0, "/a") == b""
    assert store.read(dom0, "/a/b") == b""
    assert store.directory(dom0, "/a") == ["b"]
    assert store.directory(dom0, "/a/b") == ["c"]
    assert store.directory(dom0, "/a/b/c") == []
    assert "a" in store.directory(dom0, "/")


def test_directory_lists_each_child_once(store, dom0):
    for name in ("x", "y", "z", "x"):
        store.write(dom0, f"/d/{name}", name.encode())
    assert sorted(store.directory(dom0, "/d")) == ["x", "y", "z"]


def test_read_and_directory_of_missing_node_is_enoent(store, dom0):
    assert errname(store.read, dom0, "/nope") == "ENOENT"
    assert errname(store.directory, dom0, "/nope/deeper") == "ENOENT"
    assert errname(store.get_perms, dom0, "/nope") == "ENOENT"


def test_mkdir_creates_node_and_parents(store, dom0):
    store.mkdir(dom0, "/m/n/o")
    assert store.read(dom0, "/m/n/o") == b""
    assert store.directory(dom0, "/m") == ["n"]


def test_mkdir_of_existing_node_succeeds_and_keeps_value(store, dom0):
    store.write(dom0, "/m", b"keep")
    store.write(dom0, "/m/child", b"c")
    assert store.mkdir(dom0, "/m") == []
    assert store.read(dom0, "/m") == b"keep"
    assert store.directory(dom0, "/m") == ["child"]


def test_rm_removes_the_whole_subtree(store, dom0):
    store.write(dom0, "/r/a/b/c", b"1")
    store.write(dom0, "/r/a/d", b"2")
    store.write(dom0, "/r/keep", b"3")
    before = len(store.nodes)
    store.rm(dom0, "/r/a")
    for path in ("/r/a", "/r/a/b", "/r/a/b/c", "/r/a/d"):
        assert errname(store.read, dom0, path) == "ENOENT"
    assert store.directory(dom0, "/r") == ["keep"]
    assert len(store.nodes) == before - 4


def test_rm_of_missing_node_with_existing_parent_succeeds(store, dom0):
    store.mkdir(dom0, "/p")
    assert store.rm(dom0, "/p/missing") == []
    assert store.read(dom0, "/p") == b""


def test_rm_of_missing_node_with_missing_parent_is_enoent(store, dom0):
    assert errname(store.rm, dom0, "/nothere/missing") == "ENOENT"


def test_rm_of_root_is_einval_even_for_dom0(store, dom0):
    assert errname(store.rm, dom0, "/") == "EINVAL"
    assert store.read(dom0, "/local/domain/1") == b""


# ----------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/a/",
        "a/",
        "//",
        "//a",
        "/a//b",
        "a//b",
        "/a b",
        "/a.b",
        "/a:b",
        "/a\tb",
        "/a\x00b",
        "/\u00e9",
        "/a\n",  # C xenstored's valid_chars() has no newline, trailing or not
        "\n",
        "a\n",
    ],
)
def test_invalid_paths_are_einval(store, dom0, dom1, path):
    for conn in (dom0, dom1):
        assert errname(store.write, conn, path, b"v") == "EINVAL", path
        assert errname(store.read, conn, path) == "EINVAL", path
        assert errname(store.mkdir, conn, path) == "EINVAL", path
        assert errname(store.rm, conn, path) == "EINVAL", path
        assert errname(store.watch, conn, path, "tok") == "EINVAL", path


def test_all_valid_characters_are_accepted(store, dom0):
    path = "/AZaz09-_@/x"
    store.write(dom0, path, b"ok")
    assert store.read(dom0, path) == b"ok"


def test_absolute_path_length_limit(store, dom0):
    longest = "/" + "a" * (XENSTORE_ABS_PATH_MAX - 1)
    assert len(longest) == XENSTORE_ABS_PATH_MAX == 3072
    store.write(dom0, longest, b"edge")
    assert store.read(dom0, longest) == b"edge"
    assert errname(store.write, dom0, longest + "b", b"x") == "EINVAL"
    assert errname(store.read, dom0, longest + "b") == "EINVAL"


def test_relative_path_length_limit(store, dom1, dom0):
    longest = "r" * XENSTORE_REL_PATH_MAX
    assert len(longest) == 2048
    store.write(dom1, longest, b"edge")
    assert store.read(dom0, f"/local/domain/1/{longest}") == b"edge"
    assert errname(store.write, dom1, longest + "r", b"x") == "EINVAL"
    assert errname(store.read, dom1, longest + "r") == "EINVAL"


def test_relative_paths_resolve_under_the_connection_home(store, dom0, dom1, dom2):
    store.write(dom1, "device/vif/0/state", b"1")
    store.write(dom2, "device/vif/0/state", b"2")
    assert store.read(dom0, "/local/domain/1/device/vif/0/state") == b"1"
    assert store.read(dom0, "/local/domain/2/device/vif/0/state") == b"2"
    assert store.read(dom1, "device/vif/0/state") == b"1"
    assert store.directory(dom2, "device/vif") == ["0"]
    store.write(dom0, "name", b"Domain-0")
    assert store.read(dom0, "/local/domain/0/name") == b"Domain-0"


# ------------------------------------------------------------ permissions


def test_other_domains_cannot_read_or_write_a_private_home(store, dom1, dom2):
    store.write(dom1, "secret", b"s")
    assert errname(store.read, dom2, "/local/domain/1/secret") == "EACCES"
    assert errname(store.write, dom2, "/local/domain/1/secret", b"x") == "EACCES"
    assert errname(store.write, dom2, "/local/domain/1/new", b"x") == "EACCES"
    assert errname(store.mkdir, dom2, "/local/domain/1/new") == "EACCES"
    assert errname(store.rm, dom2, "/local/domain/1/secret") == "EACCES"
    assert errname(store.directory, dom2, "/local/domain/1") == "EACCES"
    assert errname(store.get_perms, dom2, "/local/domain/1/secret") == "EACCES"
    assert store.read(dom1, "secret") == b"s"
    assert store.directory(dom1, "/local/domain/1") == ["secret"]


def test_missing_node_under_unreadable_parent_is_eacces_not_enoent(store, dom1, dom2):
    # C xenstored errno_from_parents(): you may not even learn that it is missing.
    assert errname(store.read, dom2, "/local/domain/1/missing") == "EACCES"
    assert errname(store.read, dom2, "/local/domain/1/missing/deeper") == "EACCES"
    assert errname(store.directory, dom2, "/local/domain/1/missing") == "EACCES"
    # ...while under a readable parent it is plain ENOENT.
    assert errname(store.read, dom1, "missing") == "ENOENT"
    assert errname(store.read, dom1, "missing/deeper") == "ENOENT"


def test_rm_of_missing_node_under_unreadable_parent_is_eacces(store, dom1, dom2):
    """``rm`` must not be an existence oracle for nodes one may not read.

    C xenstored do_rm() looks the node up with get_node(..., XS_PERM_WRITE);
    for a missing node errno_from_parents() turns ENOENT into EACCES when the
    nearest existing ancestor is not accessible, and only an ENOENT leads to
    the "fine, if parent exists" success path.
    """
    store.write(dom1, "private/dir/x", b"1")
    # dom2 cannot read anything in dom1's home; both answers must be the same.
    exists_answer = errname(store.rm, dom2, "/local/domain/1/private/dir/nope")
    missing_answer = errname(store.rm, dom2, "/local/domain/1/nosuch/dir/nope")
    assert (exists_answer, missing_answer) == ("EACCES", "EACCES")


def test_dom0_has_access_to_everything(store, dom0, dom1):
    store.write(dom1, "locked", b"v")
    store.set_perms(dom1, "locked", ["n1"])
    assert store.read(dom0, "/local/domain/1/locked") == b"v"
    store.write(dom0, "/local/domain/1/locked", b"w")
    store.set_perms(dom0, "/local/domain/1/locked", ["n1", "r2"])
    assert perms(store, dom0, "/local/domain/1/locked") == ["n1", "r2"]
    store.rm(dom0, "/local/domain/1/locked")
    assert errname(store.read, dom1, "locked") == "ENOENT"


def test_owner_always_has_full_access(store, dom1):
    store.write(dom1, "mine", b"v")
    store.set_perms(dom1, "mine", ["n1", "n1"])  # even an explicit 'n' for itself
    assert store.read(dom1, "mine") == b"v"
    store.write(dom1, "mine", b"w")
    assert store.read(dom1, "mine") == b"w"


@pytest.mark.parametrize(
    ("letter", "can_read", "can_write"),
    [("n", False, False), ("r", True, False), ("w", False, True), ("b", True, True)],
)
def test_default_permission_letters(store, dom0, dom2, letter, can_read, can_write):
    store.write(dom0, "/shared/node", b"v")
    store.set_perms(dom0, "/shared/node", [f"{letter}0"])
    store.set_perms(dom0, "/shared", ["r0"])  # the parent is readable
    if can_read:
        assert store.read(dom2, "/shared/node") == b"v"
    else:
        assert errname(store.read, dom2, "/shared/node") == "EACCES"
    if can_write:
        store.write(dom2, "/shared/node", b"by2")
        assert store.read(dom0, "/shared/node") == b"by2"
    else:
        assert errname(store.write, dom2, "/shared/node", b"by2") == "EACCES"
        assert store.read(dom0, "/shared/node") == b"v"


def test_per_domain_entry_overrides_the_default(store, dom0, dom2, dom3):
    store.write(dom0, "/shared/node", b"v")
    store.set_perms(dom0, "/shared/node", ["r0", "n2", "w3"])
    assert errname(store.read, dom2, "/shared/node") == "EACCES"
    assert errname(store.read, dom3, "/shared/node") == "EACCES"  # w only
    store.write(dom3, "/shared/node", b"3")
    assert store.read(Connection(4), "/shared/node") == b"3"  # the default: r


def test_only_the_owner_or_dom0_may_set_perms(store, dom0, dom1, dom2):
    store.write(dom1, "node", b"v")
    store.set_perms(dom1, "node", ["n1", "b2"])  # dom2 may read and write...
    assert store.read(dom2, "/local/domain/1/node") == b"v"
    store.write(dom2, "/local/domain/1/node", b"w")
    # ...but not change the permissions
    assert errname(store.set_perms, dom2, "/local/domain/1/node", ["n2"]) == "EACCES"
    assert errname(store.set_perms, dom2, "/local/domain/1/node", ["n1", "b2", "b3"]) \
        == "EACCES"
    assert perms(store, dom1, "node") == ["n1", "b2"]
    store.set_perms(dom0, "/local/domain/1/node", ["n1"])
    assert perms(store, dom1, "node") == ["n1"]


@pytest.mark.parametrize(
    "bad", [[], ["x1"], ["r"], ["1"], ["r-1"], ["r1x"], ["R1"], ["r65536"], ["n1", "q2"], [""]]
)
def test_invalid_permission_lists_are_einval(store, dom1, bad):
    store.write(dom1, "node", b"v")
    assert errname(store.set_perms, dom1, "node", bad) == "EINVAL"
    assert perms(store, dom1, "node") == ["n1"]


def test_perm_parse_and_str_round_trip():
    for text in ("n0", "r1", "w65535", "b42"):
        assert str(Perm.parse(text)) == text
    assert Perm.parse("b7") == Perm(7, read=True, write=True)


def test_set_perms_can_transfer_ownership(store, dom0, dom1, dom2):
    store.write(dom1, "gift", b"v")
    store.set_perms(dom1, "gift", ["n2"])
    assert perms(store, dom0, "/local/domain/1/gift") == ["n2"]
    assert errname(store.read, dom1, "gift") == "EACCES"
    assert store.read(dom2, "/local/domain/1/gift") == b"v"
    store.set_perms(dom2, "/local/domain/1/gift", ["n2", "r1"])


def test_new_node_inherits_parent_perms_with_unprivileged_creator_as_owner(
    store, dom0, dom1, dom2, dom3
):
    store.mkdir(dom1, "dir")
    store.set_perms(dom1, "dir", ["n1", "b2", "r3"])
    store.write(dom1, "dir/by1", b"")
    assert perms(store, dom0, "/local/domain/1/dir/by1") == ["n1", "b2", "r3"]
    # dom2 may write in the directory: what it creates (parents included) is its own
    store.write(dom2, "/local/domain/1/dir/by2/deep", b"")
    assert perms(store, dom0, "/local/domain/1/dir/by2") == ["n2", "b2", "r3"]
    assert perms(store, dom0, "/local/domain/1/dir/by2/deep") == ["n2", "b2", "r3"]
    # so dom2 owns it: it may set its permissions...
    store.set_perms(dom2, "/local/domain/1/dir/by2/deep", ["n2"])
    # ... and dom1, merely the parent's owner, has the default access (none)
    assert errname(store.read, dom1, "dir/by2/deep") == "EACCES"
    # a privileged creator does not take ownership: the node is exactly the parent's
    store.write(dom0, "/local/domain/1/dir/by0", b"")
    assert perms(store, dom0, "/local/domain/1/dir/by0") == ["n1", "b2", "r3"]
    assert store.read(dom3, "/local/domain/1/dir/by0") == b""


def test_creating_needs_write_access_to_the_deepest_existing_ancestor(store, dom1, dom2, dom0):
    store.mkdir(dom1, "ro")
    store.set_perms(dom1, "ro", ["n1", "r2"])
    assert errname(store.write, dom2, "/local/domain/1/ro/child", b"x") == "EACCES"
    assert errname(store.write, dom2, "/local/domain/1/ro/a/b/c", b"x") == "EACCES"
    assert errname(store.mkdir, dom2, "/local/domain/1/ro/child") == "EACCES"
    assert store.directory(dom0, "/local/domain/1/ro") == []


def test_mkdir_of_existing_node_needs_write_access(store, dom1, dom2):
    """C xenstored do_mkdir(): get_node_canonicalized(..., XS_PERM_WRITE);
    only ENOENT leads to creation, EACCES is returned as is."""
    store.mkdir(dom1, "ro")
    store.set_perms(dom1, "ro", ["n1", "r2"])
    assert store.read(dom2, "/local/domain/1/ro") == b""  # dom2 can read it
    assert errname(store.mkdir, dom2, "/local/domain/1/ro") == "EACCES"


def test_rm_needs_write_access(store, dom1, dom2):
    store.write(dom1, "ro/child", b"c")
    store.set_perms(dom1, "ro", ["n1", "r2"])
    assert errname(store.rm, dom2, "/local/domain/1/ro") == "EACCES"
    assert store.read(dom1, "ro/child") == b"c"


# ---------------------------------------------------------------- watches


def test_watch_fires_once_on_registration(store, dom1):
    events = store.watch(dom1, "/local/domain/1/dev", "tok")
    assert seen(events, dom1) == [("/local/domain/1/dev", "tok")]
    assert len(events) == 1


def test_watch_fires_for_the_path_and_descendants_only(store, dom0):
    watcher = Connection(0, privileged=True, name="watcher")
    store.watch(watcher, "/w/a", "t")
    assert seen(store.write(dom0, "/w/a", b"1"), watcher) == [("/w/a", "t")]
    assert ("/w/a/b/c", "t") in seen(store.write(dom0, "/w/a/b/c", b"1"), watcher)
    assert seen(store.write(dom0, "/w/ab", b"1"), watcher) == []  # a sibling prefix
    assert seen(store.write(dom0, "/w", b"1"), watcher) == []  # an ancestor
    assert seen(store.write(dom0, "/w/b", b"1"), watcher) == []


def test_watch_fires_on_mkdir_set_perms_and_rm(store, dom0):
    watcher = Connection(0, privileged=True, name="watcher")
    store.watch(watcher, "/w", "t")
    assert ("/w/new", "t") in seen(store.mkdir(dom0, "/w/new"), watcher)
    assert seen(store.mkdir(dom0, "/w/new"), watcher) == []  # already there: no change
    assert seen(store.set_perms(dom0, "/w/new", ["r0"]), watcher) == [("/w/new", "t")]
    assert seen(store.rm(dom0, "/w/new"), watcher) == [("/w/new", "t")]
    assert seen(store.rm(dom0, "/w/new"), watcher) == []  # nothing removed


def test_removal_fires_watches_set_below_the_removed_node(store, dom0, dom1):
    store.write(dom1, "dev/vif/0/state", b"4")
    store.watch(dom1, "/local/domain/1/dev/vif/0/state", "abs")
    store.watch(dom1, "dev/vif/0/state", "rel")
    events = store.rm(dom0, "/local/domain/1/dev")
    got = seen(events, dom1)
    assert ("/local/domain/1/dev/vif/0/state", "abs") in got
    assert ("dev/vif/0/state", "rel") in got


def test_removal_event_reaches_a_reader_even_if_only_an_unreadable_parent_remains(
    store, dom0, dom1
):
    """docs/misc/xenstore.txt (WATCH): "an application may rely on being sent
    a watch when a path which it _is_ able to read is deleted even if that
    leaves only a nonexistent unreadable parent". C xenstored fires the
    watches of each removed node while its permissions are still visible
    (delnode_sub)."""
    store.write(dom0, "/backend/vbd/1/51712/state", b"4")
    store.set_perms(dom0, "/backend/vbd/1/51712", ["n0", "r1"])
    store.set_perms(dom0, "/backend/vbd/1/51712/state", ["n0", "r1"])
    assert store.read(dom1, "/backend/vbd/1/51712/state") == b"4"
    assert errname(store.read, dom1, "/backend/vbd/1") == "EACCES"
    store.watch(dom1, "/backend/vbd/1/51712/state", "be-state")
    events = store.rm(dom0, "/backend/vbd/1/51712")
    assert ("/backend/vbd/1/51712/state", "be-state") in seen(events, dom1)


def test_watch_events_are_not_delivered_to_domains_that_cannot_read(store, dom1, dom2):
    store.watch(dom2, "/local/domain/1", "peek")
    store.watch(dom2, "/", "root")
    assert seen(store.write(dom1, "secret/x", b"s"), dom2) == []
    assert seen(store.mkdir(dom1, "other"), dom2) == []
    assert seen(store.set_perms(dom1, "secret/x", ["n1"]), dom2) == []
    # a node dom2 is allowed to read: its changes are visible
    store.write(dom1, "pub", b"p")
    assert ("/local/domain/1/pub", "peek") in seen(
        store.set_perms(dom1, "pub", ["n1", "r2"]), dom2
    )
    assert ("/local/domain/1/pub", "peek") in seen(store.write(dom1, "pub", b"q"), dom2)


def test_removal_events_are_not_delivered_to_domains_that_cannot_read(store, dom1, dom2):
    store.watch(dom2, "/local/domain/1", "peek")
    store.write(dom1, "secret/child/grandchild", b"s")
    assert seen(store.rm(dom1, "secret"), dom2) == []


def test_removal_in_a_transaction_leaks_no_events_to_domains_that_cannot_read(
    store, dom1, dom2
):
    store.watch(dom2, "/local/domain/1", "peek")
    store.write(dom1, "secret/child/grandchild", b"s")
    tx = store.transaction_start(dom1)
    store.rm(dom1, "secret", tx)
    events = store.transaction_end(dom1, tx, True)
    assert seen(events, dom2) == [], "node names of dom1's private subtree leaked"


def test_relative_watch_paths_are_reported_relative(store, dom1):
    assert seen(store.watch(dom1, "dev", "rel"), dom1) == [("dev", "rel")]
    assert ("dev/x", "rel") in seen(store.write(dom1, "dev/x", b"1"), dom1)
    assert ("dev/x", "rel") in seen(store.write(dom1, "/local/domain/1/dev/x", b"2"), dom1)
    store.watch(dom1, "/local/domain/1/dev", "abs")
    got = seen(store.write(dom1, "dev/y", b"1"), dom1)
    assert ("dev/y", "rel") in got
    assert ("/local/domain/1/dev/y", "abs") in got


def test_special_watch_paths(store, dom0):
    watcher = Connection(0, privileged=True, name="watcher")
    assert seen(store.watch(watcher, "@releaseDomain", "rel"), watcher) == [
        ("@releaseDomain", "rel")
    ]
    store.watch(watcher, "@introduceDomain", "intro")
    assert seen(store.fire_special("@releaseDomain"), watcher) == [("@releaseDomain", "rel")]
    assert seen(store.fire_special("@introduceDomain"), watcher) == [
        ("@introduceDomain", "intro")
    ]
    assert seen(store.write(dom0, "/x", b""), watcher) == []  # nodes never match


def test_special_events_do_not_match_a_watch_on_root(store, dom0):
    """C xenstored's is_child("@releaseDomain", "/") is false: special events
    only go to watches on exactly that special path."""
    watcher = Connection(0, privileged=True, name="watcher")
    store.watch(watcher, "/", "root")
    assert seen(store.fire_special("@releaseDomain"), watcher) == []
    assert seen(store.fire_special("@introduceDomain"), watcher) == []


def test_special_events_are_not_sent_to_unprivileged_domains(store, dom2):
    """docs/misc/xenstore.txt: "<wspecial> events are sent to privileged callers
    or explicitly via SET_PERMS enabled domains only" (C: check_perms_special)."""
    store.watch(dom2, "@releaseDomain", "rel")
    assert seen(store.fire_special("@releaseDomain"), dom2) == []


def test_duplicate_watch_is_eexist_and_tokens_distinguish(store, dom1):
    store.watch(dom1, "dev", "a")
    assert errname(store.watch, dom1, "dev", "a") == "EEXIST"
    store.watch(dom1, "dev", "b")
    got = seen(store.write(dom1, "dev", b""), dom1)
    assert sorted(got) == [("dev", "a"), ("dev", "b")]


def test_unwatch_and_reset_watches(store, dom1):
    store.watch(dom1, "dev", "a")
    store.watch(dom1, "other", "b")
    store.unwatch(dom1, "dev", "a")
    assert seen(store.write(dom1, "dev", b""), dom1) == []
    assert errname(store.unwatch, dom1, "dev", "a") == "ENOENT"
    assert errname(store.unwatch, dom1, "other", "wrong-token") == "ENOENT"
    store.reset_watches(dom1)
    assert seen(store.write(dom1, "other", b""), dom1) == []
    assert store.watch_count(dom1) == 0


def test_watches_belong_to_their_connection(store, dom0):
    a = Connection(0, privileged=True, name="a")
    b = Connection(0, privileged=True, name="b")
    store.watch(a, "/w", "t")
    assert errname(store.unwatch, b, "/w", "t") == "ENOENT"
    events = store.write(dom0, "/w", b"")
    assert seen(events, a) == [("/w", "t")]
    assert seen(events, b) == []


# ----------------------------------------------------------- transactions


def test_transaction_writes_are_invisible_until_commit(store, dom1):
    other = Connection(1, name="dom1-other")
    tx = store.transaction_start(dom1)
    store.write(dom1, "inside", b"tx", tx)
    assert store.read(dom1, "inside", tx) == b"tx"  # the tx sees its own write
    assert errname(store.read, dom1, "inside") == "ENOENT"  # nobody else does
    assert errname(store.read, other, "inside") == "ENOENT"
    assert store.transaction_end(dom1, tx, True) is not None
    assert store.read(other, "inside") == b"tx"


def test_commit_applies_every_kind_of_change_and_fires_watches_then(store, dom0, dom1):
    store.write(dom1, "old/child", b"c")
    store.write(dom1, "perm", b"p")
    watcher = Connection(0, privileged=True, name="watcher")
    store.watch(watcher, "/local/domain/1", "t")
    tx = store.transaction_start(dom1)
    assert store.write(dom1, "new/deep", b"n", tx) == []  # no events before commit
    assert store.mkdir(dom1, "dir", tx) == []
    assert store.rm(dom1, "old", tx) == []
    assert store.set_perms(dom1, "perm", ["n1", "r2"], tx) == []
    events = store.transaction_end(dom1, tx, True)
    assert store.read(dom0, "/local/domain/1/new/deep") == b"n"
    assert store.read(dom0, "/local/domain/1/dir") == b""
    assert errname(store.read, dom0, "/local/domain/1/old") == "ENOENT"
    assert errname(store.read, dom0, "/local/domain/1/old/child") == "ENOENT"
    assert perms(store, dom0, "/local/domain/1/perm") == ["n1", "r2"]
    assert sorted(store.directory(dom0, "/local/domain/1")) == ["dir", "new", "perm"]
    got = {p for p, _ in seen(events, watcher)}
    assert {"/local/domain/1/new/deep", "/local/domain/1/dir", "/local/domain/1/old",
            "/local/domain/1/perm"} <= got


def test_abort_discards_everything(store, dom0, dom1):
    store.write(dom1, "keep", b"k")
    watcher = Connection(0, privileged=True, name="watcher")
    store.watch(watcher, "/local/domain/1", "t")
    before = dict(store.nodes)
    tx = store.transaction_start(dom1)
    store.write(dom1, "new", b"n", tx)
    store.rm(dom1, "keep", tx)
    assert store.transaction_end(dom1, tx, False) == []
    assert store.nodes == before
    assert store.read(dom1, "keep") == b"k"
    assert errname(store.read, dom1, "new", tx) == "ENOENT"  # the transaction is gone


def test_conflicting_commit_is_eagain_and_applies_nothing(store, dom0, dom1):
    store.write(dom1, "shared", b"0")
    tx = store.transaction_start(dom1)
    assert store.read(dom1, "shared", tx) == b"0"
    store.write(dom1, "created/in/tx", b"x", tx)
    store.write(dom1, "shared", b"tx", tx)
    store.write(dom0, "/local/domain/1/shared", b"outside")  # someone else, meanwhile
    before = dict(store.nodes)
    watcher = Connection(0, privileged=True, name="watcher")
    store.watch(watcher, "/", "t")
    assert errname(store.transaction_end, dom1, tx, True) == "EAGAIN"
    assert store.nodes == before
    assert store.read(dom0, "/local/domain/1/shared") == b"outside"
    assert errname(store.read, dom0, "/local/domain/1/created") == "ENOENT"
    assert errname(store.transaction_end, dom1, tx, True) == "ENOENT"  # it is over


def test_a_node_read_in_the_transaction_and_changed_outside_conflicts(store, dom0, dom1):
    store.write(dom1, "a", b"0")
    tx = store.transaction_start(dom1)
    store.read(dom1, "a", tx)
    store.write(dom1, "b", b"derived", tx)
    store.write(dom0, "/local/domain/1/a", b"1")
    assert errname(store.transaction_end, dom1, tx, True) == "EAGAIN"
    assert errname(store.read, dom1, "b") == "ENOENT"


def test_a_node_created_outside_where_the_transaction_saw_none_conflicts(store, dom0, dom1):
    tx = store.transaction_start(dom1)
    assert errname(store.read, dom1, "flag", tx) == "ENOENT"
    store.write(dom1, "decision", b"no flag", tx)
    store.write(dom0, "/local/domain/1/flag", b"set")
    assert errname(store.transaction_end, dom1, tx, True) == "EAGAIN"


def test_unrelated_changes_do_not_conflict(store, dom0, dom1):
    tx = store.transaction_start(dom1)
    store.write(dom1, "mine", b"tx", tx)
    store.write(dom0, "/elsewhere", b"x")
    store.write(dom0, "/local/domain/2/x", b"x")
    store.transaction_end(dom1, tx, True)
    assert store.read(dom1, "mine") == b"tx"


def test_transactions_are_serializable_no_lost_update(store, dom0, dom1):
    """The classic read-modify-write with retry on EAGAIN.

    Transaction A reads a counter after an outside increment committed; A's
    increment must not overwrite it: either A sees the new value, or its
    commit fails with EAGAIN (and the retry sees it). Either way the counter
    ends at 2. (C xenstored reads the current node on first access and
    records *that* generation.)"""
    store.write(dom1, "counter", b"0")
    outside_done = False
    for _attempt in range(5):
        tx = store.transaction_start(dom1)
        if not outside_done:  # someone else increments right after A started
            store.write(dom0, "/local/domain/1/counter", b"1")
            outside_done = True
        value = int(store.read(dom1, "counter", tx))
        store.write(dom1, "counter", str(value + 1).encode(), tx)
        try:
            store.transaction_end(dom1, tx, True)
        except XenstoreError as exc:
            assert exc.name == "EAGAIN"
            continue
        break
    assert store.read(dom1, "counter") == b"2"


def test_transaction_ids_belong_to_their_connection(store, dom1, dom2):
    tx = store.transaction_start(dom1)
    assert errname(store.read, dom2, "/local/domain/2", tx) == "ENOENT"
    assert errname(store.write, dom2, "x", b"", tx) == "ENOENT"
    assert errname(store.transaction_end, dom2, tx, True) == "ENOENT"
    assert errname(store.read, dom1, "/local/domain/1", 999_999) == "ENOENT"
    store.transaction_end(dom1, tx, False)


def test_release_forgets_watches_and_transactions(store, dom1):
    store.watch(dom1, "dev", "t")
    tx = store.transaction_start(dom1)
    store.release(dom1)
    assert store.watch_count(dom1) == 0
    assert store.open_transactions(dom1) == 0
    assert errname(store.transaction_end, dom1, tx, True) == "ENOENT"


# ----------------------------------------------------------------- quotas


def test_node_quota_is_enospc_and_freed_by_rm():
    store = make_store(Quota(nodes=5))
    dom1 = Connection(1)
    for i in range(4):  # the home counts as the first owned node
        store.write(dom1, f"n{i}", b"")
    assert errname(store.write, dom1, "one-too-many", b"") == "ENOSPC"
    assert errname(store.mkdir, dom1, "one-too-many") == "ENOSPC"
    assert errname(store.read, dom1, "one-too-many") == "ENOENT"
    store.write(dom1, "n0", b"overwrite is fine")
    store.rm(dom1, "n0")
    store.write(dom1, "now-fits", b"")


def test_node_quota_failure_while_creating_parents_leaves_nothing_behind():
    """C xenstored create_node() undoes the nodes it made when the quota check
    fails part-way (the request fails as a whole)."""
    store = make_store(Quota(nodes=3))
    dom1 = Connection(1)
    before = set(store.nodes)
    assert errname(store.write, dom1, "a/b/c/d", b"x") == "ENOSPC"
    assert set(store.nodes) == before
    store.write(dom1, "a", b"")  # and the quota is still whole
    store.write(dom1, "b", b"")


def test_node_quota_does_not_apply_to_dom0():
    store = make_store(Quota(nodes=2))
    dom0 = Connection(0, privileged=True)
    for i in range(10):
        store.write(dom0, f"/tool/{i}", b"")


def test_node_quota_inside_a_transaction_is_enforced_at_commit():
    store = make_store(Quota(nodes=4))
    dom1 = Connection(1)
    tx = store.transaction_start(dom1)
    for i in range(6):
        store.write(dom1, f"n{i}", b"", tx)
    before = dict(store.nodes)
    assert errname(store.transaction_end, dom1, tx, True) == "ENOSPC"
    assert store.nodes == before


def test_watch_quota_is_e2big():
    store = make_store(Quota(watches=3))
    dom1 = Connection(1)
    for i in range(3):
        store.watch(dom1, f"w{i}", "t")
    assert errname(store.watch, dom1, "w3", "t") == "E2BIG"
    store.unwatch(dom1, "w0", "t")
    store.watch(dom1, "w3", "t")
    dom0 = Connection(0, privileged=True)
    for i in range(10):
        store.watch(dom0, f"/w{i}", "t")


def test_transaction_quota_is_enospc():
    store = make_store()
    dom1 = Connection(1)
    txs = [store.transaction_start(dom1) for _ in range(store.quota.transactions)]
    assert len(set(txs)) == 10
    assert errname(store.transaction_start, dom1) == "ENOSPC"
    store.transaction_end(dom1, txs[0], False)
    store.transaction_start(dom1)
    # per connection: another domain still has its own allowance
    store.transaction_start(Connection(2))


def test_value_size_limit_is_e2big(store, dom0, dom1):
    store.write(dom1, "max", b"m" * XENSTORE_PAYLOAD_MAX)
    assert len(store.read(dom1, "max")) == 4096
    assert errname(store.write, dom1, "big", b"m" * (XENSTORE_PAYLOAD_MAX + 1)) == "E2BIG"
    assert errname(store.write, dom0, "/big", b"m" * (XENSTORE_PAYLOAD_MAX + 1)) == "E2BIG"
    assert errname(store.read, dom1, "big") == "ENOENT"


# -------------------------------------------------- tree invariants (model)


def test_transaction_rm_and_a_concurrent_sibling_create_leave_no_orphan(store, dom0):
    """The transaction's rm rewrites the parent's child list, so the parent is
    part of what it accessed: a concurrent change of the parent (a new
    sibling) must make the commit fail, never leave a node its parent does not
    list."""
    tooling = Connection(0, privileged=True, name="tooling")
    store.write(dom0, "/a/x", b"1")
    tx = store.transaction_start(tooling)
    store.rm(tooling, "/a/x", tx)
    store.write(dom0, "/a/y", b"2")  # meanwhile
    with pytest.raises(XenstoreError) as info:
        store.transaction_end(tooling, tx, True)
    assert info.value.name == "EAGAIN"
    assert sorted(store.directory(dom0, "/a")) == ["x", "y"]
    assert_tree_consistent(store)


def assert_tree_consistent(store: Store) -> None:
    """Every node but / is listed exactly once by its existing parent, every
    listed child exists, and the quota accounting matches the real owners."""
    owned: dict[int, int] = {}
    for path, node in store.nodes.items():
        owned[node.owner] = owned.get(node.owner, 0) + 1
        assert len(set(node.children)) == len(node.children), f"{path}: duplicate children"
        for child in node.children:
            child_path = f"{path.rstrip('/')}/{child}"
            assert child_path in store.nodes, f"{path} lists missing child {child}"
        if path == "/":
            continue
        parent, name = path.rsplit("/", 1)
        parent = parent or "/"
        assert parent in store.nodes, f"{path}: orphan (no parent)"
        assert name in store.nodes[parent].children, f"{path}: not listed by {parent}"
    actual = {d: n for d, n in owned.items() if n}
    counted = {d: n for d, n in store._owned.items() if n}  # white-box: quota counters
    assert counted == actual, "quota accounting drifted from the real node owners"


_TX_SIDE = [("write", "/s/a"), ("write", "/s/a/c"), ("rm", "/s/a/b"), ("rm", "/s/a"),
            ("read", "/s/a"), ("directory", "/s/a"), ("mkdir", "/s/a/b/g"),
            ("set_perms", "/s/a")]
_OUTSIDE = [("write", "/s/a"), ("write", "/s/a/d"), ("rm", "/s/a/b"), ("rm", "/s/a"),
            ("mkdir", "/s/a/b/f"), ("set_perms", "/s/a")]
_STEPS = [("tx", *op) for op in _TX_SIDE] + [("out", *op) for op in _OUTSIDE]


def _apply(store: Store, conn: Connection, op: str, path: str, tx: int) -> None:
    if op == "write":
        store.write(conn, path, b"v", tx)
    elif op == "rm":
        store.rm(conn, path, tx)
    elif op == "mkdir":
        store.mkdir(conn, path, tx)
    elif op == "set_perms":
        store.set_perms(conn, path, ["b0"], tx)
    elif op == "read":
        store.read(conn, path, tx)
    else:
        store.directory(conn, path, tx)


def test_interleavings_of_a_transaction_keep_the_tree_consistent():
    """Bounded-exhaustive: every sequence of up to 3 steps, each either inside
    a transaction of one connection or a direct change by another, then the
    commit. Whatever commits or fails, the tree stays a tree and the quota
    counters stay true."""
    broken = []
    for length in (1, 2, 3):
        for steps in itertools.product(_STEPS, repeat=length):
            store = make_store()
            store.ensure("/s/a/b", b"", ["b0"])
            store.set_perms(Connection(0, privileged=True), "/s", ["b0"])
            store.set_perms(Connection(0, privileged=True), "/s/a", ["b0"])
            tooling, other = Connection(0, privileged=True, name="tool"), Connection(1)
            tx = store.transaction_start(tooling)
            for side, op, path in steps:
                with contextlib.suppress(XenstoreError):
                    if side == "tx":
                        _apply(store, tooling, op, path, tx)
                    else:
                        _apply(store, other, op, path, 0)
            try:
                store.transaction_end(tooling, tx, True)
            except XenstoreError as exc:
                assert exc.name == "EAGAIN", exc
            try:
                assert_tree_consistent(store)
            except AssertionError as exc:
                broken.append(f"{steps}: {exc}".splitlines()[0])
    assert broken == [], f"{len(broken)} interleavings break the tree, e.g. {broken[:4]}"
