"""sidecar/logs.py: the throttle that keeps a flood of one event to one log line per window."""

from __future__ import annotations

import asyncio

from sidecar.logs import Throttle


def test_a_flood_gives_one_line_per_window_and_loses_no_count() -> None:
    async def scenario() -> list[int]:
        lines: list[int] = []
        throttle = Throttle(0.2, lines.append)
        for _ in range(500):  # a flood inside the first window: one line at once, the rest held
            throttle.note()
        assert lines == [1]
        for _ in range(40):  # bounded: wait for the window to end and the held count to be emitted
            if len(lines) == 2:
                break
            await asyncio.sleep(0.05)
        assert lines == [1, 499]
        for _ in range(40):  # the next window passes quiet: the throttle closes it
            if throttle._timer is None:
                break
            await asyncio.sleep(0.05)
        assert throttle._timer is None
        throttle.note()  # after a quiet window the next event is logged at once again
        assert lines == [1, 499, 1]
        throttle.note()
        throttle.note()
        throttle.close()  # at shutdown what is held is emitted, and no timer is left behind
        assert lines == [1, 499, 1, 2] and throttle._timer is None
        return lines

    assert sum(asyncio.run(scenario())) == 503
