"""Progress where stderr is not a terminal (a log, CI): plain lines, not a silent bar."""

from __future__ import annotations

from kvtier import progress


def test_bar_writes_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    clock = iter([0.0, 3.0, 12.0, 14.0, 75.0])  # start, then one reading per step
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.bar(4, "speed smollm2-135m") as advance:
        for _ in range(4):
            advance()
    lines = capsys.readouterr().err.splitlines()
    # 3 s: too soon; 12 s: a line; 14 s: too soon after it; the last step: always
    assert lines == ["kvtier: speed smollm2-135m: 2/4 done, 0m12s", "kvtier: speed smollm2-135m: 4/4 done, 1m15s"]
