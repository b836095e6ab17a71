"""How well does the configured LLM label real rows? The LLM label judge's capability check
(tools/label_gate.py), run on its own: balanced accuracy on a fixed stratified sample.

    python bench/label_judge.py --data ../shared/data/toxicity/toxicchat_train.jsonl --rows 40

The gate trusts the LLM judge only at `min_agreement` (0.7) or above.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.llm import open_llm  # noqa: E402
from agent.runs import build_settings  # noqa: E402
from tools.data import load_texts  # noqa: E402
from tools.label_gate import agreement_rows, balanced_agreement, llm_labels  # noqa: E402
from tools.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--generator", default="local")
    args = ap.parse_args()
    data = load_texts(args.data, require_labels=True)
    assert data.labels is not None
    idx = agreement_rows(data.labels, args.rows)
    settings = build_settings(generator=args.generator)
    t0 = time.monotonic()
    with open_llm(settings, ROOT / "bench" / "out", Workspace(settings)) as llm:
        said = llm_labels([data.texts[i] for i in idx], llm)
    truth = [data.labels[i] for i in idx]
    print(f"{len(idx)} rows: balanced agreement {balanced_agreement(said, truth):.2f}; "
          f"answers {dict(Counter(said))}; {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
