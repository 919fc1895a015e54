"""Ring ends hold the shared mapping until released (so it is never unmapped under them)."""

import pytest

from pvio.ring import BLKIF, BackRing, FrontRing, LocalProtocolError, SharedMemory


def test_shared_memory_cannot_close_under_a_ring_until_released():
    shm = SharedMemory.create(4 * 4096)
    front = FrontRing.init(BLKIF, shm.page(0))
    back = BackRing.attach(BLKIF, shm.page(0))
    with pytest.raises(LocalProtocolError):
        shm.close()
    front.produce(bytes(BLKIF.req_size))  # the mapping is intact after the refusal
    assert len(back.take_requests()) == BLKIF.req_size
    front.release()
    back.release()
    shm.close()
