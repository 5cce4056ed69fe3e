"""The serving event loop's selector (server/protocol.py SpinningSelector, `--idle-spin-us`): after a wait
that found events it polls before it sleeps; a wait that found nothing ends the polling, so an idle
server does not spin. Checked through the timeouts it hands epoll, not through timing."""
import asyncio
import selectors
import socket

import pytest

from vibrato.config import Config
from vibrato.server.protocol import SpinningSelector, run


class _Recording:
    """Stands in for the selector's epoll object, recording each poll's timeout."""

    def __init__(self, epoll):
        self.epoll, self.timeouts = epoll, []

    def poll(self, timeout=-1, maxevents=-1):
        self.timeouts.append(timeout)
        return self.epoll.poll(timeout, maxevents)

    def __getattr__(self, name):
        return getattr(self.epoll, name)


@pytest.fixture
def spinning():
    sel = SpinningSelector(0.02)
    sel._selector = _Recording(sel._selector)
    a, b = socket.socketpair()
    sel.register(a, selectors.EVENT_READ)
    yield sel, a, b
    sel.close()
    a.close()
    b.close()


def test_after_events_it_polls_before_it_sleeps_and_idle_waits_end_that(spinning):
    sel, a, b = spinning
    polls = sel._selector.timeouts
    assert sel.select(0.01) == [] and polls == [0.01]  # idle from the start: one blocking wait
    b.send(b"x")
    assert len(sel.select(5)) == 1 and polls == [0.01, 5]  # no polling before any events
    a.recv(1)
    polls.clear()
    assert sel.select(0.05) == []  # after events: polls (timeout 0) for ~20 ms, then the blocking wait
    assert polls[0] == 0 and polls[-1] == 0.05 and set(polls[:-1]) == {0} and len(polls) > 2
    polls.clear()
    assert sel.select(0.01) == [] and polls == [0.01]  # that wait found nothing: no more polling
    b.send(b"y")
    sel.select(None)
    a.recv(1)
    polls.clear()
    b.send(b"z")  # already there: the first poll finds it
    assert len(sel.select(5)) == 1 and polls == [0]


def test_zero_timeout_waits_neither_spin_nor_end_the_polling(spinning):
    """asyncio asks select(0) whenever callbacks are ready: that is not idleness."""
    sel, a, b = spinning
    b.send(b"x")
    sel.select(None)
    a.recv(1)
    polls = sel._selector.timeouts
    polls.clear()
    assert sel.select(0) == [] and polls == [0]
    polls.clear()
    sel.select(0.001)
    assert polls[0] == 0 and polls[-1] == 0.001


def test_run_uses_the_spinning_selector_only_when_asked():
    async def selector():
        return type(asyncio.get_running_loop()._selector)
    assert run(selector(), 100) is SpinningSelector
    assert run(selector(), 0) is not SpinningSelector


def test_idle_spin_us_is_bounded():
    assert Config(data_dir="/tmp/x", dim=4).idle_spin_us == 100
    with pytest.raises(ValueError, match="--idle-spin-us"):
        Config(data_dir="/tmp/x", dim=4, idle_spin_us=20_000)
