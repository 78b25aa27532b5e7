"""Machine and version header shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import os
import platform


def machine_header() -> str:
    import galsim
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"machine: {platform.platform()}; {os.cpu_count()} cores; {cpu}\n"
        f"python {platform.python_version()}, numpy {numpy.__version__}, galsim {galsim.__version__}, "
        f"torch {torch.__version__}"
    )


def append_results(path, title: str, body: str) -> None:
    """Append a dated section to a results Markdown file (kept in the repo)."""
    with open(path, "a") as fh:
        fh.write(f"\n## {title}\n\n```\n{body.rstrip()}\n```\n")
