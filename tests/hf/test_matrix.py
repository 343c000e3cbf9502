"""The architecture x method matrix of issue 13 (``benchmarks/_matrix.py``): on five user architectures
and four transformers models built from tiny configs, every method either works (with its output
check: exact .nsk round trip, masked-twin diff, ORT vs torch gap, sparsity / distinct values
delivered), gives one clear NetshrinkError and leaves the model running, or changes nothing and says
why. Never a crash, a silent skip or a broken model.

Cells that fail today are listed in KNOWN with what they do and whose area it is; they run (and are
reported as xfail) so a fix shows up as XPASS. The transformers cells are skipped cleanly when
transformers is not installed (``pip install -e .[hf]``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks._archs import ARCHS, HF_ARCHS, LNMLP, USER_ARCHS, ResNet18
from benchmarks._matrix import FINE, METHODS, run_cell

HAS_HF = importlib.util.find_spec("transformers") is not None

#: (architecture, method) -> what fails today and whose area it is
KNOWN: dict[tuple[str, str], str] = {}


def _cases():
    for arch in sorted(ARCHS):
        for method in METHODS:
            marks = []
            if arch in HF_ARCHS and not HAS_HF:
                marks.append(pytest.mark.skip(reason="transformers is not installed (pip install -e .[hf])"))
            if (arch, method) in KNOWN:
                marks.append(pytest.mark.xfail(reason=KNOWN[(arch, method)], strict=False))
            yield pytest.param(arch, method, marks=marks, id=f"{arch}-{method}")


@pytest.mark.parametrize("arch,method", list(_cases()))
def test_cell_works_or_gives_one_clear_error(arch, method, tmp_path):
    cell = run_cell(arch, method, tmp_path)
    print(f"{arch} x {method}: {cell.outcome} {cell.check or cell.message}")
    assert cell.outcome in FINE, f"{cell.outcome}: {cell.message}"
    if cell.outcome == "works":
        assert cell.check  # every working cell carries its output check
    else:
        assert cell.message and "\n" not in cell.message


def test_user_architectures_have_what_the_issue_names():
    torch.manual_seed(0)
    for name, arch in USER_ARCHS.items():
        model, data = arch.build()
        assert not model.training and len(data) > 0, name
    r = ResNet18()
    shortcuts = [m.downsample[0] for m in r.modules() if getattr(m, "downsample", None) is not None]
    assert len(shortcuts) == 3 and all(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in shortcuts)
    assert sum(p.numel() for p in ResNet18(width=64, in_ch=3, classes=1000).parameters()) > 11_000_000  # torchvision: 11.7M
    m = LNMLP()
    called = []
    hook = m.unused.register_forward_hook(lambda *a: called.append(1))
    m(torch.zeros(2, 64))
    hook.remove()
    assert not called  # the layer forward never calls


def test_a_crash_and_a_broken_model_are_recorded_not_raised(monkeypatch, tmp_path):
    import benchmarks._matrix as mx

    def crash(ctx):
        raise KeyError("oops")

    def breaks(ctx):
        ctx.model.forward = lambda *a, **k: 1 / 0
        return mx._runs(ctx) and "unreachable"

    monkeypatch.setitem(mx.RUNNERS, "magnitude", crash)
    monkeypatch.setitem(mx.RUNNERS, "kmeans", breaks)
    a, b = run_cell("ln_mlp", "magnitude", tmp_path), run_cell("ln_mlp", "kmeans", tmp_path)
    assert a.outcome == "crash" and "KeyError" in a.message
    assert b.outcome == "broken" and "ZeroDivisionError" in b.message
