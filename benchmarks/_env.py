"""Machine and version facts that every results file carries."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines(command: str | None = None) -> list[str]:
    import numpy
    import torch

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort = "not installed"
    cmd = command or "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return [
        f"- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"- torch threads: {torch.get_num_threads()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, onnxruntime {ort}",
        f"- command: `{cmd.strip()}`",
    ]
