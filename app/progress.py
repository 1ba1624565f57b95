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
