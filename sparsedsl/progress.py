"""Progress bars for long-running commands (documentation pictures, benchmarks, examples).

``tqdm`` draws the bar when it is installed; otherwise a one-line text bar is redrawn on
standard error. Both end with ``done/total`` on the line, and the bar closes on leaving a
``with`` block.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A bar over ``total`` steps labelled ``desc``; ``update(label)`` advances it by one
    and shows ``label`` (the current item, a loss) beside it."""

    WIDTH = 30

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total, self.desc, self.done, self.start = total, desc, 0, time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            self._draw("")
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def _draw(self, label: str) -> None:
        filled = self.WIDTH * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                         f"{self.done}/{self.total} {elapsed:5.1f}s {label[:40]:<40}")
        sys.stderr.flush()

    def update(self, label: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            self._draw(label)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
