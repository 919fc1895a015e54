"""The learning switch: learning, aging, flooding, per-port bounds."""

from pvio.netif import NO_OFFLOAD, Frame
from pvio.netswitch import Switch

A, B, C = (bytes.fromhex(f"02000000000{i}") for i in (1, 2, 3))
BCAST = b"\xff" * 6


def frame(dst, src, payload=b"x" * 46):
    return dst + src + b"\x08\x00" + payload


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_unknown_destination_floods_then_learned_unicast_goes_to_one_port():
    sw = Switch()
    pa, pb, pc = (sw.add_port(n) for n in "abc")
    assert set(sw.forward(pa, frame(B, A))) == {pb, pc}  # B unknown: flood
    assert sw.forward(pb, frame(A, B)) == [pa]  # A was learned on port a
    assert sw.forward(pa, frame(B, A)) == [pb]  # and B on port b
    assert sw.fdb() == {A.hex(":"): "a", B.hex(":"): "b"}


def test_broadcast_and_multicast_flood_and_are_never_learned():
    sw = Switch()
    pa, pb, pc = (sw.add_port(n) for n in "abc")
    assert set(sw.forward(pa, frame(BCAST, A))) == {pb, pc}
    mcast_src = bytes.fromhex("010000000001")
    sw.forward(pb, frame(BCAST, mcast_src))
    assert mcast_src.hex(":") not in sw.fdb()
    assert set(sw.forward(pc, frame(bytes.fromhex("01005e000001"), C))) == {pa, pb}


def test_entries_age_out():
    clock = Clock()
    sw = Switch(aging=10, clock=clock)
    pa, pb, pc = (sw.add_port(n) for n in "abc")
    sw.forward(pb, frame(A, B))
    assert sw.forward(pa, frame(B, A)) == [pb]
    clock.now = 11
    assert set(sw.forward(pc, frame(B, C))) == {pa, pb}  # B aged out: flood again


def test_a_port_that_does_not_read_loses_frames_not_memory():
    sw = Switch(queue_frames=8)
    pa, pb = sw.add_port("a"), sw.add_port("b")
    for _ in range(100):
        sw.forward(pa, frame(BCAST, A))
    assert len(pb.queue) == 8
    assert pb.stats.dropped == 92
    assert len(pb.take(100)) == 8 and pb.stats.tx_frames == 8


def test_runts_are_counted_and_dropped():
    sw = Switch()
    pa, _ = sw.add_port("a"), sw.add_port("b")
    assert sw.forward(pa, b"\x00" * 13) == []
    assert pa.stats.runts == 1


def test_removed_port_is_forgotten():
    sw = Switch()
    pa, pb = sw.add_port("a"), sw.add_port("b")
    sw.forward(pb, frame(A, B))
    sw.remove_port(pb)
    assert sw.fdb() == {}
    assert sw.forward(pa, frame(B, A)) == []


def test_a_port_bound_to_a_source_mac_drops_frames_with_another():
    """Anti-spoofing: a frame claiming B's MAC from port a is dropped and
    counted, and B's traffic still goes to B (the table is not poisoned);
    the port's own MAC and other ports are unaffected."""
    sw = Switch()
    pa, pb, pc = (sw.add_port(n) for n in "abc")
    pa.source = A
    seen = []
    pa.taps.append(lambda direction, f: seen.append(direction))
    assert sw.forward(pb, frame(BCAST, B)) == [pa, pc]  # B learned on b
    assert sw.forward(pa, frame(C, B)) == []
    assert sw.forward(pa, frame(BCAST, B)) == []
    assert pa.stats.spoofed == 2 and seen == ["out", "in", "in"]  # captures show them
    assert sw.fdb()[B.hex(":")] == "b"
    assert sw.forward(pc, frame(B, C)) == [pb]
    assert sw.forward(pa, frame(B, A)) == [pb]
    assert pa.stats.spoofed == 2


def test_forward_run_checks_the_run_s_source_once():
    sw = Switch()
    pa, pb = sw.add_port("a"), sw.add_port("b")
    pa.source = A
    spoofed = [Frame(frame(B, C), NO_OFFLOAD) for _ in range(3)]
    sw.forward_run(pa, spoofed, sum(len(f.data) for f in spoofed))
    assert pa.stats.spoofed == 3 and not pb.queue and C.hex(":") not in sw.fdb()
    good = [Frame(frame(B, A), NO_OFFLOAD) for _ in range(3)]
    sw.forward_run(pa, good, sum(len(f.data) for f in good))
    assert len(pb.queue) == 3 and pa.stats.spoofed == 3
