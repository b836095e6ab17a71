"""One job in its own process: `python -m agent.job_worker --root ROOT [--model M --sae S
--generator G] JOB_ID`, started detached by `facsynth serve` (agent/jobs.py, runner
`process`). It builds the toolbox the server has (the same root, flags, environment and
working directory, so the same facsynth.toml), runs the job's work from its record and
writes the outcome there; logs go to stderr (the job's `.log` file)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def command(root: Path, **given: str | None) -> list[str]:
    """The worker command for jobs of a server on `root` started with `given` flags (the job
    id is appended when a job starts)."""
    flags = [x for k, v in given.items() if v is not None for x in (f"--{k}", v)]
    return [sys.executable, "-m", "agent.job_worker", "--root", str(root), *flags]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--model")
    ap.add_argument("--sae")
    ap.add_argument("--generator")
    ap.add_argument("job_id")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from agent.runs import build_settings
    from agent.toolbox import Toolbox

    settings = build_settings(model=args.model, sae=args.sae, generator=args.generator)
    with Toolbox(settings, args.root) as box:
        rec = box.jobs.execute(args.job_id)
    logging.getLogger(__name__).info("job %s: %s", args.job_id, rec.status)


if __name__ == "__main__":
    main()
