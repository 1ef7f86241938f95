"""Run a script in a fresh Python, for behaviour that depends on what a process has imported or allocated."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping


def run_python(script: str, env: Mapping[str, str] | None = None, timeout_s: float = 120, cwd=None) -> str:
    """The script's stdout; the test fails with its stderr when it exits non-zero. (`python -c` imports
    from its working folder first: `cwd` elsewhere than the repository keeps its packages out.)"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout
