"""A run's saved separation and an analyst's unsaved draft of it.

The pipeline separates at the thresholds recorded in ``run.json`` plus the manual moves in
``overrides.json`` (:func:`saved`). An interactive client (the dashboard) lets the analyst try
other thresholds and moves first; :class:`Draft` holds them, and :func:`write_draft` keeps them in
the run folder (``.draft.json``) so that a reloaded browser tab finds them again instead of losing
them. Saving applies a draft to the run (a ``cgd separate`` job) and :func:`clear_draft` drops it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

from .config import RunConfig, SeparationConfig
from .runs import RunDir, read_json, utcnow, write_json
from .separation import Subset

__all__ = ["Draft", "saved", "read_draft", "write_draft", "clear_draft", "DRAFT_NAME", "parse_indices"]

DRAFT_NAME = ".draft.json"


@dataclass(frozen=True)
class Draft:
    """Thresholds and manual moves ({sample index: Subset code}) under consideration for a run."""

    separation: SeparationConfig
    overrides: dict[int, int] = field(default_factory=dict)

    def differs_from(self, other: "Draft") -> bool:
        a, b = self.separation, other.separation
        return (any(abs(getattr(a, k) - getattr(b, k)) > 1e-9 for k in ("sigma1", "sigma2", "sigma3"))
                or a.rank_mode != b.rank_mode or dict(self.overrides) != dict(other.overrides))

    def with_values(self, **values) -> "Draft":
        """A copy with SeparationConfig fields (sigma1, ...) and/or ``overrides`` replaced."""
        ov = values.pop("overrides", self.overrides)
        return Draft(replace(self.separation, **values), {int(k): int(v) for k, v in ov.items()})

    def to_dict(self) -> dict:
        return {**asdict(self.separation), "overrides": {str(k): int(v) for k, v in sorted(self.overrides.items())}}


def saved(run: RunDir) -> Draft:
    """The separation the run will use: its recorded thresholds and saved manual moves (unreadable
    overrides count as none)."""
    cfg = RunConfig.from_dict(run.read_run().get("config", {}))
    try:
        ov = run.read_overrides()
    except ValueError:
        ov = {}
    return Draft(cfg.separation, ov)


def read_draft(run: RunDir) -> Draft | None:
    """The unsaved draft kept in the run folder, or None (none, unreadable, or equal to the saved one)."""
    try:
        d = read_json(run.path(DRAFT_NAME), None)
        if not d:
            return None
        sep = SeparationConfig(float(d["sigma1"]), float(d["sigma2"]), str(d["rank_mode"]), float(d["sigma3"]))
        draft = Draft(sep, {int(k): int(Subset.parse(v)) for k, v in (d.get("overrides") or {}).items()})
    except (ValueError, KeyError, TypeError):
        return None
    return draft if draft.differs_from(saved(run)) else None


def write_draft(run: RunDir, draft: Draft) -> None:
    """Keep ``draft`` in the run folder (or remove the file when it equals the saved separation)."""
    if not draft.differs_from(saved(run)):
        clear_draft(run)
        return
    write_json(run.path(DRAFT_NAME), {**draft.to_dict(), "updated": utcnow(), "pid": os.getpid()})


def clear_draft(run: RunDir) -> None:
    run.path(DRAFT_NAME).unlink(missing_ok=True)


def parse_indices(text: str, n: int, max_items: int = 1_000_000) -> tuple[list[int], list[str]]:
    """Sample indices typed as ``"12, 40-45, 101"``: (indices in [0, n), the parts that are not).

    Ranges are clipped to [0, n) before they are expanded, so ``0-500000000`` on a 50,000-sample run
    gives 50,000 indices, never a list of 500 million; at most ``max_items`` indices are returned.
    """
    import re

    out: list[int] = []
    bad: list[str] = []
    for part in re.split(r"[,\s]+", (text or "").strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d{1,18})(?:-(\d{1,18}))?", part)
        if not m:
            bad.append(part)
            continue
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or lo >= n:
            bad.append(part)
            continue
        hi = min(hi, n - 1)
        if hi < int(m.group(2) or m.group(1)):
            bad.append(f"{part} (clipped to {lo}-{hi})")
        out.extend(range(lo, min(hi + 1, lo + max_items - len(out))))
        if len(out) >= max_items:
            bad.append(f"more than {max_items:,} indices: the rest was ignored")
            break
    return sorted(set(out)), bad
