"""Reading ``benchmarks/results/``: each results file, and ``runs.json``, which names the
date, commit, device, software and command of every file."""

from __future__ import annotations

import json
from functools import lru_cache

from .registry import ROOT

RESULTS = ROOT / "benchmarks" / "results"


@lru_cache(maxsize=None)
def runs() -> dict[str, dict[str, str]]:
    """``runs.json``: file name -> ``date``, ``commit``, ``device``, ``software``,
    ``command``, ``what``."""
    return json.loads((RESULTS / "runs.json").read_text())


@lru_cache(maxsize=None)
def rows(name: str):
    """The content of one results file."""
    if name not in runs():
        raise KeyError(f"benchmarks/results/{name} is not described in runs.json")
    return json.loads((RESULTS / name).read_text())


def provenance(name: str) -> str:
    """One line naming a results file's date, commit, device, software and command."""
    r = runs()[name]
    return (f"`benchmarks/results/{name}`: {r['date']}, commit {r['commit']}, {r['device']}, "
            f"{r['software']}; `{r['command']}`")


def newest_cases(prefix: str) -> dict[str, tuple[dict, str]]:
    """Each case of the files named ``prefix*`` from the newest file holding it (file
    names sort by date, then by the run's letter): case -> (row, file)."""
    found: dict[str, tuple[dict, str]] = {}
    for name in sorted((n for n in runs() if n.startswith(prefix)), reverse=True):
        for row in rows(name):
            found.setdefault(row["case"], (row, name))
    return found
