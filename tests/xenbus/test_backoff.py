"""StallBackoff: how long a device refuses connects after its frontend stalled
the daemon (blocked a notification), sans-I/O with a hand-driven clock."""

from __future__ import annotations

from pvio.xenbus.device import StallBackoff


def test_refusals_double_per_stall_up_to_the_limit():
    b = StallBackoff(base=1.0, limit=8.0, forget=600.0)
    assert b.refusal(0.0) is None
    pauses = [b.strike(t, f"stall {i}") for i, t in enumerate((0.0, 10.0, 20.0, 30.0, 40.0))]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert "refused for another 5.0 s" in b.refusal(43.0)
    assert "5 time(s); last: stall 4" in b.refusal(43.0)
    assert b.refusal(48.0) is None


def test_a_quiet_spell_forgets_earlier_stalls():
    b = StallBackoff(base=1.0, limit=60.0, forget=100.0)
    b.strike(0.0, "a")
    b.strike(50.0, "b")
    assert b.count == 2 and b.refusal(51.0) is not None
    assert b.strike(151.0, "c") == 1.0 and b.count == 1


def test_base_zero_never_refuses():
    b = StallBackoff(base=0.0)
    assert b.strike(0.0, "x") == 0.0
    assert b.refusal(0.0) is None
