"""The transfer progress bar (services/cli/progress.py) on a stream it is given, with a clock the
test moves: drawn only for big transfers, at most every REDRAW_SECONDS but always at the end,
one line of plain text that fits the terminal, with bytes, percentage and rate; and shown only
on a terminal, never with --json or --quiet."""

from __future__ import annotations

import io

from corral.services.cli.output import Output
from corral.services.cli.progress import MIN_BYTES, REDRAW_SECONDS, ProgressBar, for_transfer, size

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(drawn: str) -> list[str]:
    return [line for line in drawn.replace("\n", "").split("\r") if line]


def test_sizes() -> None:
    assert [size(n) for n in (0, 1023, 1536, 24 * MiB, 3 * 1024 * MiB)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "24.0 MiB",
        "3.0 GiB",
    ]


def test_small_transfers_draw_nothing() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, "small.txt", clock=Clock(), columns=80)
    bar(0, MIN_BYTES - 1)
    bar(MIN_BYTES - 1, MIN_BYTES - 1)
    bar.close()
    assert stream.getvalue() == ""


def test_bytes_percent_and_rate_redrawn_in_place() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(stream, "data/big.bin", clock=clock, columns=100)
    total = 24 * MiB
    bar(0, total)
    for done in range(2 * MiB, total + 1, 2 * MiB):
        clock.now += 0.1  # 2 MiB every 0.1 s: 20 MiB/s
        bar(done, total)
    bar.close()
    drawn = stream.getvalue()
    assert drawn.endswith("\n") and drawn.count("\n") == 1
    first, *_, last = lines(drawn)
    assert first.startswith("data/big.bin") and "0 B / 24.0 MiB    0%" in first
    assert first.endswith("-- B/s")
    assert "12.0 MiB / 24.0 MiB   50% [" in drawn
    assert "24.0 MiB / 24.0 MiB  100% [" in last and last.endswith("20.0 MiB/s")
    assert "-" not in last.split("[")[1].split("]")[0]  # the bar is full
    assert {len(line) for line in lines(drawn)} == {99}  # fits, without jitter
    assert "\x1b" not in drawn


def test_redraws_at_most_every_interval_but_always_the_end() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(stream, "f", clock=clock, columns=80)
    total = 10 * MiB
    for done in range(0, total, MiB):
        clock.now += REDRAW_SECONDS / 4
        bar(done, total)
    bar(total, total)
    drawn = lines(stream.getvalue())
    assert len(drawn) == 1 + 2 + 1  # the first, one per interval, the end
    assert "100%" in drawn[-1]


def test_a_long_name_is_shortened_from_the_left_and_a_narrow_terminal_has_no_bar() -> None:
    stream = io.StringIO()
    name = "workspaces/w/files/" + "x" * 200 + "/result.bin"
    ProgressBar(stream, name, clock=Clock(), columns=80)(5 * MiB, 10 * MiB)
    (line,) = lines(stream.getvalue())
    assert line.startswith("...") and "result.bin" in line and len(line) <= 79
    narrow = io.StringIO()
    ProgressBar(narrow, name, clock=Clock(), columns=40)(5 * MiB, 10 * MiB)
    (line,) = lines(narrow.getvalue())
    assert "[" not in line and len(line) <= 39


def test_only_on_a_terminal_and_not_with_json_or_quiet() -> None:
    assert for_transfer(Output(err=Terminal()), "f", quiet=False) is not None
    assert for_transfer(Output(err=io.StringIO()), "f", quiet=False) is None
    assert for_transfer(Output(err=Terminal(), json_mode=True), "f", quiet=False) is None
    assert for_transfer(Output(err=Terminal()), "f", quiet=True) is None
    # Not colour: --no-color leaves it on.
    assert for_transfer(Output(err=Terminal(), no_color=True), "f", quiet=False) is not None
