"""Stop a job at once, with the fix, when it runs under a Python without the project installed.

``ray job submit --working-dir . -- python pipelines/embed.py ...`` runs its entrypoint through a
shell on the head node with the ``PATH`` that ``ray start`` had. A Ray started from the project's
virtual environment without activating it (``.venv/bin/ray start --head``) therefore runs the job
under whatever ``python`` that ``PATH`` finds first (a system or pyenv Python), and the job died
deep in an import: ``No module named 'PIL'``. The job entry scripts call
``require_project_python`` before any third-party import: such a job ends with exit status 2
and a message naming the interpreter, what it lacks, and the two ways out (start Ray from the
activated environment, or give the job a runtime environment whose ``PATH`` leads to it).

Standard library only: it runs exactly when the third-party packages are missing.
"""

from __future__ import annotations

import importlib.util
import sys

# what every job imports (the embedding job adds torch and torchvision)
REQUIRED = ("numpy", "pyarrow", "fsspec", "PIL", "faiss", "ray", "yaml", "pydantic")


def missing_modules(names: tuple[str, ...] = REQUIRED) -> list[str]:
    """The top-level modules of ``names`` this interpreter cannot import."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def advice(script: str, missing: list[str]) -> str:
    return (
        f"error: {script} runs under {sys.executable}, which lacks {', '.join(missing)}: "
        "this is not the project's Python environment.\n"
        "A job's `python` is the first one on the PATH that `ray start` had on the head node. "
        "Either start Ray from the activated environment:\n"
        "    source .venv/bin/activate && ray stop && ray start --head\n"
        "or give the job a runtime environment whose PATH leads to it:\n"
        "    ray job submit --working-dir . --runtime-env-json "
        '\'{"env_vars": {"PATH": "/path/to/visual-search/.venv/bin:${PATH}"}}\' -- python ...\n'
    )


def require_project_python(script: str, extra: tuple[str, ...] = ()) -> None:
    """Exit 2 with ``advice`` unless every module the job needs can be imported."""
    missing = missing_modules(REQUIRED + extra)
    if missing:
        sys.stderr.write(advice(script, missing))
        raise SystemExit(2)
