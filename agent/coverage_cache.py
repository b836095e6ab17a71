"""Coverage reports of the toolbox (agent/toolbox.py), cached per (anchor, data) pair.

A report is held in memory and saved as `ROOT/.facsynth/coverage/<key>.json` (the state
folder, checked by the sandbox; replaced atomically). It is reused while its fingerprint
holds: both files (path, mtime, size) and every setting that shapes a report (model, SAE,
activity rule, judge, graded rule, tokens, spans). An unreadable cache file is measured again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sandbox import Sandbox
from tools.data import write_text_atomic
from tools.settings import Settings

if TYPE_CHECKING:
    from tools.coverage import CoverageReport


class CoverageCache:
    """Reports by (anchor, data) file pair; see the module doc."""

    def __init__(self, settings: Settings, sandbox: Sandbox) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self._held: dict[tuple[str, str, str], tuple[str, CoverageReport]] = {}

    def fingerprint(self, *paths: Path) -> str:
        s = self.settings
        parts: dict[str, Any] = {
            "model": s.model, "sae": s.sae, "rule": s.activity_rule().model_dump(),
            "judge": s.judge.model_dump(), "graded": s.graded.model_dump(),
            "max_tokens": s.max_tokens,
            "chat_template": s.chat_template, "top_spans": s.top_spans,
            "span_window": s.span_window,
            "files": [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def file(self, anchor: Path, data: Path, task: str = "toxicity") -> Path:
        """The cache file of the pair read as `task`'s rows (PathRefused when it would lead
        out of the root)."""
        pair = f"{anchor}\n{data}" + ("" if task == "toxicity" else f"\n{task}")
        key = hashlib.sha256(pair.encode()).hexdigest()[:16]
        return self.sandbox.state_path("coverage", f"{key}.json")

    def lookup(self, anchor: Path, data: Path, task: str = "toxicity"
               ) -> tuple[str, CoverageReport | None]:
        """(the pair's fingerprint now, its report when one was measured on exactly that)."""
        from tools.coverage import CoverageReport

        fp = self.fingerprint(anchor, data)
        held = self._held.get((str(anchor), str(data), task))
        if held and held[0] == fp:
            return fp, held[1]
        cache = self.file(anchor, data, task)
        if cache.exists():
            try:
                saved = json.loads(cache.read_text(encoding="utf-8"))
                if saved.get("fingerprint") == fp:
                    report = CoverageReport.model_validate(saved["report"])
                    self._held[(str(anchor), str(data), task)] = (fp, report)
                    return fp, report
            except (ValueError, KeyError):
                pass  # unreadable: measure again
        return fp, None

    def store(self, anchor: Path, data: Path, fp: str, report: CoverageReport,
              task: str = "toxicity") -> None:
        """Keep `report`, measured when the pair's fingerprint was `fp`."""
        write_text_atomic(self.file(anchor, data, task), json.dumps({
            "fingerprint": fp, "anchor": str(anchor), "data": str(data), "task": task,
            "report": report.model_dump(mode="json"),
        }))
        self._held[(str(anchor), str(data), task)] = (fp, report)

    def forget(self) -> None:
        """Drop the reports held in memory (the next lookup reads the cache files)."""
        self._held.clear()
