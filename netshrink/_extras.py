"""Optional dependencies: what each extra of ``pip install netshrink[...]`` brings, and one clear error.

The core (pruning, quantization, packing, training, recipes) needs torch, numpy, scipy, PyYAML,
safetensors and tqdm. The rest is imported lazily, where it is used, through :func:`require`:

=============== ============================ ==========================================
extra           packages                     used by
=============== ============================ ==========================================
``onnx``        onnx, onnxruntime            ONNX export and onnxruntime evaluation
``lowrank``     tensorly                     Tucker and CP decomposition of convolutions
``plot``        matplotlib                   PNG plots of run reports and sensitivity sweeps
``digits``      scikit-learn                 the ``digits`` data set
``hf``          transformers                 tests on ``transformers`` models
``all``         all of the above but ``hf``
=============== ============================ ==========================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import NetshrinkError

#: top-level module -> the extra that installs it
EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "tensorly": "lowrank",
    "matplotlib": "plot",
    "sklearn": "digits",
    "transformers": "hf",
}


class MissingExtraError(NetshrinkError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module``; if it (or its top-level package) is not installed, raise one
    :class:`MissingExtraError` line naming the extra: ``pip install 'netshrink[onnx]'``."""
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top, "all")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is broken: not ours to rename
        raise MissingExtraError(f"{module} is not installed; it comes with the extra {extra!r}: pip install 'netshrink[{extra}]'") from None
