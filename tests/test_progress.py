"""``start``'s progress line: its figures and formatting with a fake clock, and the real CLI
on a pseudo-terminal (the line for a source without a length, the bar, percentage and ETA for
a known length, outputs never on the line's line, the final state printed once)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from typing import List, Tuple

import pytest

from remotemedia.frames import FrameInfo
from supervisor.cli import _duration, _Progress, _Rate
from supervisor.core import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- formatting, fake clock


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def info(origin: int) -> FrameInfo:
    return FrameInfo(origin, origin, 0, 0, 0, "n")


def test_rate_starts_at_the_first_frame_then_smooths():
    r = _Rate(tau=2.0)
    assert r.update(0, 10.0) is None  # nothing has moved: no figure, not 0
    assert r.update(4, 11.0) is None  # the first frame starts the clock
    assert r.update(14, 12.0) == pytest.approx(10.0)  # the plain average while younger than tau
    assert r.update(24, 13.0) == pytest.approx(10.0)
    # after tau: each step moves it by 1 - exp(-dt / tau) towards the new rate
    got = r.update(24 + 30, 14.0)
    assert got == pytest.approx(10.0 + (1 - 2.718281828 ** -0.5) * (30.0 - 10.0), rel=1e-6)
    for i in range(1, 40):  # a steady 30/s: it gets there
        got = r.update(54 + 30 * i, 14.0 + i)
    assert got == pytest.approx(30.0, rel=1e-3)
    assert r.update(54 + 30 * 39, 14.0 + 39) == got  # no time passed: unchanged
    assert r.average(54 + 30 * 39, 14.0 + 39) == pytest.approx((54 + 30 * 39 - 4) / (53.0 - 11.0))


def test_duration_formats():
    assert [_duration(x) for x in (0, 0.4, 42, 59.6, 60, 187, 3600, 3723)] == ["0s", "0s", "42s", "1:00", "1:00", "3:07", "1:00:00", "1:02:03"]
    assert _duration(-3) == "0s"


def test_known_length_shows_bar_percentage_and_eta():
    clock = Clock()
    figures = [Progress(0, 300, 0, 0, "booting")]
    p = _Progress(lambda: figures[0], None, single_source=True, clock=clock)
    assert p.text(columns=200) == "[....................] 0% 0/300  in 0  out 0  - frames/s  restarts 0  starting 0s"
    figures[0] = Progress(64, 300, 0, 1, "running")  # the source ran ahead by its window
    clock.t += 1.0
    for i in range(10):
        p.output(info(i))
    # the bar counts items whose outputs reached the sink, not what the source has produced
    assert p.text(columns=200).startswith("[....................] 3% 10/300  in 64  out 10  - frames/s  restarts 1  ETA ?")
    clock.t += 1.0
    for i in range(10, 60):
        p.output(info(i))
    line = p.text(columns=200)
    # 50 items in 1 s since the first: 240 left -> 4.8 s
    assert line == "[####................] 20% 60/300  in 64  out 60  50.0 frames/s  restarts 1  ETA 5s"
    figures[0] = Progress(300, 300, 0, 1, "draining")
    clock.t += 1.0
    for i in range(60, 290):
        p.output(info(i))
    assert p.text(columns=200).endswith("draining 3s")
    clock.t += 0.5
    # the last ten were dropped by a filter: a completed run is at 100%
    assert p.text("done", columns=200) == "[####################] 100% 300/300  in 300  out 290  112.0 frames/s  restarts 1  done in 4s"


def test_bar_never_goes_back_and_narrow_terminal_drops_the_bar():
    clock = Clock()
    figures = [Progress(40, 100, 0, 0, "running")]
    p = _Progress(lambda: figures[0], None, single_source=False, clock=clock)
    assert "40% 40/100" in p.text(columns=200)
    figures[0] = Progress(30, 100, 0, 0, "running")  # (a figure read mid-restart)
    assert "40% 40/100" in p.text(columns=200)
    narrow = p.text(columns=60)
    assert narrow.startswith("40% 40/100") and "[" not in narrow


def test_unknown_length_shows_counts_rate_and_elapsed_without_percentage():
    clock = Clock()
    figures = [Progress(5, None, 7, 2, "running")]
    p = _Progress(lambda: figures[0], None, clock=clock)
    clock.t += 65
    line = p.text(columns=200)
    assert line == "in 12  out 0  - frames/s  restarts 2  1:05"
    assert "%" not in line and "ETA" not in line
    assert p.text("stopped", columns=200).endswith("stopped after 1:05")


def test_outputs_and_logs_go_above_the_line_and_redraws_are_rate_limited():
    clock = Clock()
    err = io.StringIO()
    out = io.StringIO()
    p = _Progress(lambda: Progress(0, None, 0, 0, "running"), err, clock=clock, interval=0.1)
    p.start()
    p._stop.set()  # (no ticks from its thread: this test draws by hand)
    assert err.getvalue().startswith(_Progress.CLEAR + "in 0") and p.shown
    n = err.getvalue().count(_Progress.CLEAR)
    with p.printing():
        assert err.getvalue().endswith(_Progress.CLEAR) and not p.shown  # off the line first
        out.write("an output\n")
    assert not p.shown  # no time has passed: no redraw yet
    clock.t += 0.125
    with p.printing():
        pass
    assert p.shown and err.getvalue().count(_Progress.CLEAR) == n + 2  # cleared once, drawn once
    log = p.above(err)
    log.write("a log line\n")
    assert err.getvalue().endswith(_Progress.CLEAR + "a log line\n")
    p.close("done")
    assert err.getvalue().endswith("done in 0s\n") and p.closed
    p.close("done")  # once
    assert err.getvalue().count("done in") == 1


# --------------------------------------------------------------------------- the CLI on a terminal


def screen(raw: str) -> List[str]:
    """The lines a terminal ends up showing for ``raw`` (\\r, \\n and erase-to-end-of-line;
    the pty turns \\n into \\r\\n)."""
    lines: List[str] = []
    cur: List[str] = []
    col = 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del cur[col:]
            i += 3
            continue
        ch = raw[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur))
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    if cur:
        lines.append("".join(cur))
    return lines


def run_on_pty(args: List[str], timeout: float = 120.0) -> Tuple[int, str, List[Tuple[float, str]]]:
    """``remotemedia-supervisor ARGS`` with stdout and stderr on one pseudo-terminal of 150
    columns: (exit code, everything written, (time, chunk) as read)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, cwd=ROOT)
    os.close(slave)
    chunks = []
    t0 = time.monotonic()
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append((time.monotonic() - t0, data.decode(errors="replace")))
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, "".join(c for _, c in chunks), chunks


PROGRESS = re.compile(r"in \d+  out \d+  (-|[\d.]+) frames/s  restarts \d+")


@pytest.mark.slow
def test_cli_line_for_a_source_without_length(tmp_path):
    script = tmp_path / "endless.py"
    script.write_text(
        "import time\n"
        "from remotemedia.node import Source\n"
        "class Ticks(Source):\n"
        "    def generate(self):\n"
        "        for i in range(25):\n"
        "            time.sleep(0.04)\n"
        "            yield i\n"
        "pipeline = [Ticks(name='ticks')]\n"
    )
    rc, raw, chunks = run_on_pty(["start", str(script)])
    assert rc == 0, raw
    # drawn while the run went on, not only at the end (all of it may come in one read on a
    # busy host: look at the draws, not at the chunks)
    lines = screen(raw)
    draws = re.findall(r"\x1b\[K(in \d+  out \d+  [^\r\n\x1b]*)", raw)
    assert [d for d in draws if "done in" not in d and int(d.split()[1]) > 0], raw
    assert "%" not in raw and "ETA" not in raw
    final = [line for line in lines if PROGRESS.search(line)]
    assert len(final) == 1 and re.search(r"in 25  out 25  [\d.]+ frames/s  restarts 0  done in \d+s$", final[0]), lines
    assert [line for line in lines if line.startswith("[ticks #")] == [f"[ticks #{i}] {i}" for i in range(25)]


@pytest.mark.slow
def test_cli_known_length_bar_eta_outputs_above_final_once(tmp_path):
    script = tmp_path / "paced.py"
    script.write_text(
        "import time\n"
        "from remotemedia.node import Node\n"
        "from remotemedia.nodes import RangeSource\n"
        "class Slow(Node):\n"
        "    def process(self, x):\n"
        "        time.sleep(0.03)\n"
        "        return x\n"
        "pipeline = [RangeSource(40), Slow(name='slow')]\n"
    )
    rc, raw, chunks = run_on_pty(["start", str(script)])
    assert rc == 0, raw
    lines = screen(raw)
    # every output line is an output alone; every progress line is the line alone
    outputs = [line for line in lines if line.startswith("[slow #")]
    assert outputs == [f"[slow #{i}] {i}" for i in range(40)], lines
    for line in lines:
        assert not (PROGRESS.search(line) and "[slow #" in line), line
    # the final state, once, on its own line, before the report
    final = [i for i, line in enumerate(lines) if PROGRESS.search(line)]
    assert len(final) == 1, lines
    assert re.fullmatch(r"\[#{20}\] 100% 40/40  in 40  out 40  [\d.]+ frames/s  restarts 0  done in \d+s", lines[final[0]]), lines
    assert lines[final[0] + 1].startswith("pipeline 'paced': 40 outputs")
    # while it ran: a percentage below 100 and an ETA
    drawn = re.findall(r"\s(\d+)% (\d+)/40 .*?ETA (\d+s|\?)", raw)
    assert any(int(pct) < 100 and eta != "?" for pct, _, eta in drawn), raw


@pytest.mark.slow
def test_cli_progress_flags(tmp_path):
    script = tmp_path / "fin.py"
    script.write_text("from remotemedia.nodes import RangeSource, PassThroughNode\npipeline = [RangeSource(30), PassThroughNode()]\n")
    rc, raw, _ = run_on_pty(["start", str(script), "--quiet", "--no-progress"])
    assert rc == 0 and not PROGRESS.search(raw) and "\x1b[K" not in raw, raw
    # --progress draws on a pipe too; the outputs on stdout are untouched
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "start", str(script), "--progress"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"100% 30/30  in 30  out 30  [\d.]+ frames/s  restarts 0  done in", r.stderr), r.stderr
    assert r.stdout.splitlines() == [f"[PassThroughNode #{i}] {i}" for i in range(30)]
