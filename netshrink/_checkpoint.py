"""Training checkpoints: atomic writes, safe reads, and the checks a resume needs.

A checkpoint is one file, ``<checkpoint_dir>/checkpoint.pt``, written by ``torch.save`` after every
finished epoch and read only with ``torch.load(..., weights_only=True)``, so opening one never runs
code. It holds a plain dict (layout in :data:`REQUIRED_KEYS` and :func:`build_payload`):

``format``/``version``
    ``"netshrink.train.checkpoint"`` and :data:`VERSION`.
``epochs_done``/``epochs``/``finished``
    the epochs finished so far, the target of the run, and whether ``epochs_done >= epochs``.
``model``/``optimizer``/``scheduler``
    the three ``state_dict()`` objects (tensors are stored on the device they were on; a
    resume maps them to CPU first and then copies them into the model and optimizer).
``history``
    one plain dict per finished epoch (see :class:`netshrink.train.EpochStats`).
``rng``
    the torch CPU generator state, every CUDA generator's state, Python's ``random`` state and
    NumPy's global state (as a tensor and plain numbers), taken at the end of the epoch.
``config``/``fingerprint``
    the :class:`~netshrink.train.TrainConfig` as a dict and a hash of the fields that shape the
    training trajectory.

The write is atomic: the payload goes to a temporary file in the same folder, is flushed and
``fsync``-ed, and replaces the old checkpoint with ``os.replace``. A crash or Ctrl-C during the write
leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ._fileio import atomic_write
from .errors import NetshrinkError

FORMAT = "netshrink.train.checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

#: key -> type every checkpoint must hold
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "epochs_done": int,
    "epochs": int,
    "finished": bool,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "history": list,
    "rng": dict,
    "config": dict,
    "fingerprint": str,
}


class CheckpointError(NetshrinkError):
    """A training checkpoint is unreadable, corrupt, or does not fit the model or config."""


def checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint file inside ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


# ----------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The states of torch's CPU and CUDA generators, Python's ``random`` and NumPy's global RNG."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the generators back to a state from :func:`capture_rng` (CUDA only where it fits)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = state.get("python")
    if py is not None:
        random.setstate(_as_tuples(py))
    npst = state.get("numpy")
    if npst is not None:
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))


def _as_tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; a stored state may come back with lists
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


# --------------------------------------------------------------------------------- write / read


def build_payload(
    *,
    epochs_done: int,
    epochs: int,
    model: Mapping[str, Any],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    history: list[dict[str, Any]],
    config: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    """The dict a checkpoint holds (layout in the module docstring); RNG states are taken now."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "epochs_done": epochs_done,
        "epochs": epochs,
        "finished": epochs_done >= epochs,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "history": history,
        "rng": capture_rng(),
        "config": config,
        "fingerprint": fingerprint,
        "torch_version": str(torch.__version__),
    }


def save_atomic(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``payload`` with ``torch.save`` to ``path`` atomically (temp file, fsync, replace).

    The payload is serialized in memory first, so a failing write (a full disk, a read-only folder) is
    the ``OSError`` of the file write, raised as one :class:`netshrink._outdir.OutputError` line, and the
    previous checkpoint stays as it was.
    """
    import io

    from ._outdir import output_errors

    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    blob = buf.getvalue()
    with output_errors(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: fh.write(blob))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check a checkpoint; any problem is one :class:`CheckpointError`.

    The file is read with ``weights_only=True``: it may hold tensors and plain data only.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises many kinds on a damaged or foreign file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a netshrink checkpoint "
            f"(it could not be read as tensors and plain data: {type(err).__name__}); "
            "delete it to start afresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a netshrink training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this netshrink reads version {VERSION}"
        )
    for key, tp in REQUIRED_KEYS.items():
        if not isinstance(payload.get(key), tp):
            raise CheckpointError(f"checkpoint {path} is corrupt: entry {key!r} is missing or malformed")
    if payload["epochs_done"] < 0:
        raise CheckpointError(f"checkpoint {path} is corrupt: epochs_done is {payload['epochs_done']}")
    return payload


# ------------------------------------------------------------------------------------- checks


def check_model_fits(state: Mapping[str, Any], model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems: list[str] = []
    if missing:
        problems.append("missing " + _some(missing))
    if unexpected:
        problems.append("unexpected " + _some(unexpected))
    for key, value in state.items():
        if key in own:
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key} is not a tensor")
            elif tuple(value.shape) != tuple(own[key].shape):
                problems.append(
                    f"{key} has shape {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
                )
        if len(problems) >= 4:
            break
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(problems))


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more}"


def raise_config_mismatch(path: str | os.PathLike[str], saved: Mapping[str, Any], now: Mapping[str, Any], keys: list[str]) -> None:
    """Raise the :class:`CheckpointError` of a checkpoint written with another config, naming the fields."""
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]
    raise CheckpointError(
        f"checkpoint {path} was written with a different training config ({'; '.join(diffs) or 'fingerprint differs'}); "
        "use the same config, or resume=False to start afresh"
    )
