"""Terminal progress for CLI commands: library functions report progress(stage, fraction), this draws it."""

from __future__ import annotations


def progress_bars():
    """A progress(stage, fraction) callback that draws one tqdm bar per stage (silent when not a tty)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, fraction: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=100, desc=stage, leave=False, disable=None)
        bar.update(int(fraction * 100) - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def counting_bar(total: int, unit: str, desc: str):
    """A progress(stage, fraction) callback drawing one bar of `total` units, shown like training's bar:
    always, so a multi-minute estimate is never silent, also when stderr goes to a log (there it redraws
    every 10 s instead of 10 times a second, so the log stays readable)."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, mininterval=0.1 if tty else 10.0)

    def progress(stage: str, fraction: float) -> None:
        bar.update(round(fraction * total) - bar.n)

    return progress, bar.close
