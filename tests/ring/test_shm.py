"""SharedMemory (sealed memfd regions) and PagePool (the frontend's guest memory)."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading

import pytest

from pvio.ring import PAGE_SIZE, LocalProtocolError, PagePool, SharedMemory

REQUIRED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@pytest.fixture
def shm():
    region = SharedMemory.create(8 * PAGE_SIZE, name="test-shm")
    yield region
    region.close()


@pytest.fixture
def pool():
    region = SharedMemory.create(16 * PAGE_SIZE, name="test-pool")
    yield PagePool(region)
    region.close()


# ------------------------------------------------------------------ SharedMemory


@pytest.mark.parametrize(
    "size", [0, -PAGE_SIZE, 1, PAGE_SIZE - 1, PAGE_SIZE + 1, 3 * PAGE_SIZE // 2]
)
def test_create_rejects_non_page_sizes(size):
    with pytest.raises(LocalProtocolError):
        SharedMemory.create(size)


def test_create_is_sealed_zeroed_cloexec(shm):
    fd = shm.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED == REQUIRED
    assert os.fstat(fd).st_size == shm.size == 8 * PAGE_SIZE
    assert shm.pages == 8
    assert not any(shm.buf)
    assert not os.get_inheritable(fd)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, PAGE_SIZE)


def test_page_views_are_bounded_and_aliased(shm):
    whole = shm.page(0, shm.pages)
    assert whole.nbytes == shm.size
    for frame in range(shm.pages):
        view = shm.page(frame)
        assert view.nbytes == PAGE_SIZE
        view[0] = frame + 1
        view[-1] = 0xF0 | frame
        assert shm.buf[frame * PAGE_SIZE] == frame + 1
        assert shm.buf[(frame + 1) * PAGE_SIZE - 1] == 0xF0 | frame
        view.release()
    run = shm.page(2, 3)
    assert run.nbytes == 3 * PAGE_SIZE
    assert (run[0], run[PAGE_SIZE], run[2 * PAGE_SIZE]) == (3, 4, 5)
    run.release()
    whole.release()


@pytest.mark.parametrize(("frame", "count"), [
    (-1, 1), (8, 1), (9, 1), (0, 0), (0, -1), (0, 9), (7, 2), (4, 5), (2**40, 1), (-8, 9),
])
def test_page_out_of_bounds(shm, frame, count):
    with pytest.raises(LocalProtocolError):
        shm.page(frame, count)


def test_from_fd_shares_the_same_pages(shm):
    peer = SharedMemory.from_fd(os.dup(shm.fileno()), min_size=8 * PAGE_SIZE)
    try:
        assert peer.pages == shm.pages
        shm.buf[5 * PAGE_SIZE + 7] = 0xAB
        assert peer.buf[5 * PAGE_SIZE + 7] == 0xAB
        peer.buf[0] = 0xCD
        assert shm.buf[0] == 0xCD
    finally:
        peer.close()


def test_close_is_idempotent_and_closes_the_fd():
    region = SharedMemory.create(PAGE_SIZE)
    fd = region.fileno()
    with region:
        region.buf[0] = 1
    region.close()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


# ---------------------------------------------------------------------- PagePool


def test_alloc_is_first_fit_and_counts(pool):
    assert pool.free_pages == 16
    assert [pool.alloc() for _ in range(3)] == [0, 1, 2]
    assert pool.alloc(4) == 3
    assert pool.free_pages == 9
    assert pool.alloc(9) == 7
    assert pool.free_pages == 0


def test_first_frame_is_reserved():
    region = SharedMemory.create(8 * PAGE_SIZE)
    try:
        pool = PagePool(region, first_frame=3)
        assert pool.free_pages == 5
        frames = [pool.alloc() for _ in range(5)]
        assert frames == [3, 4, 5, 6, 7]
        with pytest.raises(MemoryError):
            pool.alloc()
    finally:
        region.close()


@pytest.mark.parametrize("count", [0, -1])
def test_alloc_needs_a_positive_count(pool, count):
    with pytest.raises(LocalProtocolError):
        pool.alloc(count)
    assert pool.free_pages == 16


def test_alloc_zeroes_reused_pages(pool):
    frame = pool.alloc(3)
    view = pool.shm.page(frame, 3)
    view[:] = b"\xa5" * len(view)
    pool.free(frame, 3)
    again = pool.alloc(3)
    assert again == frame
    assert not any(view)
    view.release()


def test_alloc_zeroes_only_what_it_hands_out(pool):
    a = pool.alloc()
    b = pool.alloc()
    pool.shm.buf[b * PAGE_SIZE] = 0x77
    pool.free(a)
    pool.shm.buf[a * PAGE_SIZE] = 0x55  # stale data in a free page
    assert pool.alloc() == a
    assert pool.shm.buf[a * PAGE_SIZE] == 0
    assert pool.shm.buf[b * PAGE_SIZE] == 0x77  # a live neighbour is untouched


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0), (0, 2, 1)])
def test_free_merges_neighbours(pool, order):
    frames = [pool.alloc(2) for _ in range(3)]  # 0, 2, 4
    rest = pool.alloc(10)
    assert pool.free_pages == 0
    for i in order:
        pool.free(frames[i], 2)
    assert pool.free_pages == 6
    assert pool.alloc(6) == 0  # one run again, whatever the freeing order
    pool.free(0, 6)
    pool.free(rest, 10)
    assert pool.alloc(16) == 0


def test_exhaustion_and_fragmentation(pool):
    frames = [pool.alloc() for _ in range(16)]
    with pytest.raises(MemoryError):
        pool.alloc()
    for f in frames[::2]:
        pool.free(f)
    assert pool.free_pages == 8
    with pytest.raises(MemoryError):
        pool.alloc(2)  # 8 pages free, but no two adjacent
    assert pool.alloc() == 0
    pool.free(frames[1])
    assert pool.alloc(2) == 1  # frames 1 and 2 merged


def test_quarantined_pages_are_never_reused(pool):
    frame = pool.alloc(2)
    pool.quarantine(frame, 2)
    assert pool.quarantined == 2
    got = [pool.alloc() for _ in range(14)]
    assert frame not in got and frame + 1 not in got
    with pytest.raises(MemoryError):
        pool.alloc()


def test_revoke_and_free_quarantines_pages_the_peer_still_maps(pool):
    """The one revoke-then-free of blkfront, netfront and ringdev: pages whose
    grants all end are freed; if the peer still maps one, the pages are
    quarantined, and the other grants end anyway."""
    from pvio.ring import GrantMapper, GrantTable

    gnttab = GrantTable.create(64, name="test-revoke")
    try:
        mapper = GrantMapper(gnttab.shm, pool.shm, domid=1)
        frame = pool.alloc(2)
        refs = [gnttab.grant_access(1, frame + i) for i in range(2)]
        mapper.pin(refs[1], writable=True)  # the peer still maps the second page
        assert pool.revoke_and_free(frame, 2, gnttab, refs) is False
        assert pool.quarantined == 2
        assert gnttab.entry(refs[0]).flags == 0 and gnttab.entry(refs[1]).flags != 0
        assert frame not in [pool.alloc() for _ in range(14)]
        mapper.unpin(refs[1], writable=True)
    finally:
        gnttab.close()


def test_revoke_and_free_frees_pages_whose_grants_end(pool):
    from pvio.ring import GrantTable

    gnttab = GrantTable.create(64, name="test-revoke")
    try:
        frame = pool.alloc(3)
        refs = [gnttab.grant_access(1, frame + i) for i in range(3)]
        assert pool.revoke_and_free(frame, 3, gnttab, refs) is True
        assert pool.free_pages == 16 and pool.quarantined == 0
        assert all(gnttab.entry(r).flags == 0 for r in refs)
    finally:
        gnttab.close()


def test_double_free_is_refused(pool):
    """Freeing a free page would hand it out twice: two owners of one granted page."""
    frame = pool.alloc()
    pool.free(frame)
    with pytest.raises(LocalProtocolError):
        pool.free(frame)
    assert pool.free_pages == 16
    got = [pool.alloc() for _ in range(16)]
    assert sorted(got) == list(range(16))


@pytest.mark.parametrize(("frame", "count"), [(16, 1), (15, 2), (-1, 1), (0, 0)])
def test_free_outside_the_pool_is_refused(pool, frame, count):
    with pytest.raises(LocalProtocolError):
        pool.free(frame, count)
    assert pool.free_pages == 16


def test_concurrent_alloc_free_never_hands_a_page_out_twice(pool):
    owned: set[int] = set()
    lock = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        mine: list[tuple[int, int]] = []
        for _ in range(2000):
            if mine and rnd.random() < 0.5:
                frame, count = mine.pop(rnd.randrange(len(mine)))
                with lock:
                    owned.difference_update(range(frame, frame + count))
                pool.free(frame, count)
                continue
            count = rnd.choice((1, 1, 2, 3))
            try:
                frame = pool.alloc(count)
            except MemoryError:
                continue
            with lock:
                clash = owned.intersection(range(frame, frame + count))
                if clash:
                    errors.append(f"frames {sorted(clash)} handed out twice")
                owned.update(range(frame, frame + count))
            mine.append((frame, count))
        for frame, count in mine:
            with lock:
                owned.difference_update(range(frame, frame + count))
            pool.free(frame, count)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert pool.free_pages == 16
    assert pool.alloc(16) == 0
