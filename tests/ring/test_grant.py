"""Grant table semantics, granter and mapper sides (grant_table.h v1)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pvio.layouts import GNTST, GNTTAB_NR_RESERVED_ENTRIES, GTF
from pvio.ring import CopyOp, GrantError, GrantMapper, GrantTable, PagePool, SharedMemory

BACKEND_DOMID = 0


@pytest.fixture
def granter():
    table = GrantTable.create(64)
    pool = PagePool(SharedMemory.create(16 * 4096))
    yield table, pool
    table.close()
    pool.shm.close()


@pytest.fixture
def mapper(granter):
    table, pool = granter
    m = GrantMapper(table.shm, pool.shm, BACKEND_DOMID)
    yield m
    m.close()


def test_grant_writes_domid_frame_and_flags(granter):
    table, pool = granter
    frame = pool.alloc()
    ref = table.grant_access(7, frame, readonly=True)
    entry = table.entry(ref)
    assert entry.domid == 7
    assert entry.frame == frame
    assert entry.flags == GTF.permit_access | GTF.readonly


def test_reserved_refs_are_never_handed_out(granter):
    table, _ = granter
    refs = [table.grant_access(0, 1) for _ in range(table.nr_entries - GNTTAB_NR_RESERVED_ENTRIES)]
    assert min(refs) == GNTTAB_NR_RESERVED_ENTRIES
    assert len(set(refs)) == len(refs)
    with pytest.raises(GrantError) as info:
        table.grant_access(0, 1)
    assert info.value.status == GNTST.no_space


def test_end_access_recycles_the_ref(granter):
    table, _ = granter
    ref = table.grant_access(0, 2)
    assert table.end_access(ref)
    assert table.entry(ref).flags == GTF.invalid
    assert table.grant_access(0, 3) == ref  # LIFO reuse, as Linux recommends


def test_revoke_fails_while_mapped_and_succeeds_after_unmap(granter, mapper):
    table, pool = granter
    frame = pool.alloc()
    ref = table.grant_access(BACKEND_DOMID, frame)
    mapping = mapper.map([ref], writable=True)
    assert table.entry(ref).flags & (GTF.reading | GTF.writing) == GTF.reading | GTF.writing
    assert not table.end_access(ref)
    assert table.entry(ref).flags & GTF.permit_access  # untouched by the failed revoke
    mapping.close()
    assert table.entry(ref).flags == GTF.permit_access
    assert table.end_access(ref)


def test_make_readonly_refused_while_a_writer_holds_the_page(granter, mapper):
    table, pool = granter
    ref = table.grant_access(BACKEND_DOMID, pool.alloc())
    mapping = mapper.map([ref], writable=True)
    assert not table.make_readonly(ref)
    mapping.close()
    assert table.make_readonly(ref)
    with pytest.raises(GrantError) as info:
        mapper.map([ref], writable=True)
    assert info.value.status == GNTST.general_error


def test_pins_are_counted_flags_clear_with_the_last_pin(granter, mapper):
    table, pool = granter
    ref = table.grant_access(BACKEND_DOMID, pool.alloc())
    rw = mapper.map([ref], writable=True)
    ro = mapper.map([ref], writable=False)
    rw.close()
    assert table.entry(ref).flags & (GTF.reading | GTF.writing) == GTF.reading
    ro.close()
    assert table.entry(ref).flags & (GTF.reading | GTF.writing) == 0


def test_multi_page_map_is_contiguous_in_ref_order(granter, mapper):
    table, pool = granter
    frames = [pool.alloc() for _ in range(4)]
    for i, frame in enumerate(frames):
        pool.shm.page(frame)[:8] = f"page{i:04d}".encode()
    refs = [table.grant_access(BACKEND_DOMID, f) for f in reversed(frames)]
    with mapper.map(refs, writable=True) as mapping:
        got = [bytes(mapping.buf[i * 4096 : i * 4096 + 8]) for i in range(4)]
        mapping.buf[4096 * 3 : 4096 * 3 + 4] = b"back"
    assert got == [b"page0003", b"page0002", b"page0001", b"page0000"]
    assert bytes(pool.shm.page(frames[0])[:4]) == b"back"


def test_copy_batch_reports_each_element(granter, mapper):
    table, pool = granter
    good = table.grant_access(BACKEND_DOMID, pool.alloc())
    ro = table.grant_access(BACKEND_DOMID, pool.alloc(), readonly=True)
    ops = [
        CopyOp(good, 100, b"hello", to_grant=True),
        CopyOp(ro, 0, b"nope", to_grant=True),
        CopyOp(good, 4095, bytearray(2)),
        CopyOp(good, 100, bytearray(5)),
    ]
    assert mapper.copy(ops) == [GNTST.okay, GNTST.general_error, GNTST.bad_copy_arg, GNTST.okay]
    assert bytes(ops[3].local) == b"hello"
    assert table.entry(good).flags == GTF.permit_access  # transient pins released


def test_copy_vec_gives_the_same_statuses_and_bytes_as_copy(granter, mapper):
    table, pool = granter
    good = table.grant_access(BACKEND_DOMID, pool.alloc())
    ro = table.grant_access(BACKEND_DOMID, pool.alloc(), readonly=True)
    other = table.grant_access(BACKEND_DOMID + 1, pool.alloc())
    local = bytearray(b"0123456789abcdef")
    cases = [(good, 100, 5, 0), (ro, 0, 4, 5), (good, 4095, 2, 9), (other, 0, 1, 11),
             (10**6, 0, 1, 12), (good, 200, 4, 14)]  # the last runs past the local buffer
    statuses = mapper.copy_vec([c[0] for c in cases], [c[1] for c in cases],
                               [c[2] for c in cases], local, [c[3] for c in cases],
                               to_grant=True)
    ops = [CopyOp(ref, off, local[lo:lo + n], to_grant=True) for ref, off, n, lo in cases[:-1]]
    assert statuses[:-1] == mapper.copy(ops)
    assert statuses[-1] == GNTST.bad_copy_arg
    back = bytearray(5)
    assert mapper.copy_vec([good], [100], [5], back, [0], to_grant=False) == [GNTST.okay]
    assert back == b"01234"
    assert table.entry(good).flags == GTF.permit_access  # transient pins released


def test_read_only_grant_is_read_only_in_the_mmu(granter, tmp_path):
    """A read-only grant is mapped PROT_READ: a write faults instead of landing."""
    table, pool = granter
    frame = pool.alloc()
    ref = table.grant_access(BACKEND_DOMID, frame, readonly=True)
    script = textwrap.dedent(
        f"""
        import os
        from pvio.ring import GrantMapper, SharedMemory
        table = SharedMemory.from_fd(int(os.environ["T"]))
        pool = SharedMemory.from_fd(int(os.environ["P"]))
        m = GrantMapper(table, pool, {BACKEND_DOMID})
        mapping = m.map([{ref}], writable=False)
        print(bytes(mapping.buf[:2]).decode(), flush=True)
        mapping.buf[0:1] = b"X"
        print("wrote", flush=True)
        """
    )
    t_fd, p_fd = os.dup(table.shm.fileno()), os.dup(pool.shm.fileno())
    pool.shm.page(frame)[:2] = b"ok"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "T": str(t_fd), "P": str(p_fd)},
            pass_fds=(t_fd, p_fd),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(t_fd)
        os.close(p_fd)
    assert proc.stdout.splitlines() == ["ok"]
    assert proc.returncode == -signal.SIGSEGV
    assert bytes(pool.shm.page(frame)[:2]) == b"ok"
