"""Run one measurement in a fresh process and read its result: the last line it
prints, as JSON (shared by the benchmarks whose workers print one)."""

from __future__ import annotations

import json
import subprocess


def run_json(argv: list[str], env: dict | None = None) -> dict:
    """``argv``'s last line of output as JSON, or ``{"error": ...}`` with the last
    line of its error output when it fails."""
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])
