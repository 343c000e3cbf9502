"""A structure-aware fuzzer of .nsk files (for the tests and the reliability benchmark).

Flipping bytes of a file only exercises the checksums. This fuzzer parses the container, mutates what
the header says -- field types, lengths, shapes, bit widths, codebooks, Huffman stream heads, model
arguments, edits -- and the section payloads, then recomputes every checksum, so each mutation reaches
the schema, the budgets and the decoders behind them. Each case is then read by every entry point,
and its outcome is one of: ``ok`` (the mutation was harmless), the class name of a
:class:`~netshrink.errors.NetshrinkError`, ``crash`` (any other exception) or ``hang`` (past the
time limit).

The seed files are real packed models of every encoding (:func:`seed_files`): raw, sparse (mask),
codebook, sparse codebook, int-k affine with and without zero points (and input quantizers), binary,
ternary, float16 and bfloat16 casts, fixed, Huffman (block) and rANS coding, and models with replaced
layers (low-rank, hashed). rANS sections get the mutations Huffman sections get: their head fields
(precision, symbol-set mode, the reserved bit) and the bits of their table (K, lanes, symbols,
frequencies) tweaked with the checksums recomputed.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import struct
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import NetshrinkError
from ._format import FLAG_DEFLATE, MAGIC, PRELUDE, VERSION

_HUFF_HEAD = struct.Struct("<BBBB4xIIQQ")
_HEAD_FIELDS = ("layout", "mode", "gw", "sw", "entries", "sync_every", "count", "nbits")
_HEAD_WIDTH = {"layout": 8, "mode": 8, "gw": 8, "sw": 8, "entries": 32, "sync_every": 32, "count": 64, "nbits": 64}


@dataclass(frozen=True)
class Seed:
    name: str
    blob: bytes


class Hang(BaseException):
    """A case ran past its time limit (a BaseException, so that no ``except Exception`` on the way, e.g.
    around a lazy import, can swallow it and leave a half-imported module behind)."""


# ------------------------------------------------------------------------------------------ seeds


def _digits_mlp(hidden: tuple[int, ...] = (16,)):
    from ..models import build_model

    return build_model("mlp", in_features=64, hidden=list(hidden), num_classes=10).eval()


def seed_files(seed: int = 0) -> list[Seed]:
    """Real packed models of every encoding (zoo models, so ``load`` rebuilds them)."""
    import io

    import torch

    from .._registry import handler_for
    from ..prune._mask import apply_mask
    from ..quantize import BinaryConfig, Int8Config, TernaryConfig, UniformConfig, quantize_
    from ..quantize._sharing import apply_sharing
    from ..quantize._storage import HalfConfig
    from .nsk import _emit

    def packed(model, coding: str) -> bytes:
        buf = io.BytesIO()
        _emit(buf, model, coding, {"seed": seed, "note": "fuzz seed"}, None)
        return buf.getvalue()

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(64, 64, generator=g)
    out: list[Seed] = []
    out.append(Seed("raw", packed(_digits_mlp(), "fixed")))
    for coding in ("fixed", "huffman", "rans"):
        m = _digits_mlp((24, 16))
        w1, w2 = m.fc1.weight.detach(), m.fc2.weight.detach()
        apply_mask(m.fc1, torch.rand(w1.shape, generator=g) > 0.7)
        cb = torch.linspace(float(w2.min()), float(w2.max()), 8)
        apply_mask(m.fc2, torch.rand(w2.shape, generator=g) > 0.6)
        apply_sharing(m.fc2, cb, (w2.reshape(-1, 1) - cb).abs().argmin(1).reshape(w2.shape))
        apply_sharing(m.fc3, cb[:4].clone(), torch.randint(0, 4, m.fc3.weight.shape, generator=g))
        out.append(Seed(f"sparse+codebook/{coding}", packed(m, coding)))
    quant = [("int8+act", Int8Config()), ("affine_zp", UniformConfig(bits=3, symmetric=False, per_channel=False, activations=False)),
             ("binary", BinaryConfig()), ("ternary", TernaryConfig()), ("float16", HalfConfig(dtype="float16")),
             ("bfloat16", HalfConfig(dtype="bfloat16"))]
    for name, cfg in quant:
        m = _digits_mlp()
        quantize_(m, cfg, data=x)
        out.append(Seed(name, packed(m.eval(), "auto" if name != "binary" else "huffman")))
    from ..lowrank import SvdConfig
    from ..matrices import HashedConfig

    for name, cfg in (("lowrank", SvdConfig(rank=4)), ("hashed", HashedConfig(ratio=0.25))):
        m = _digits_mlp((24,))
        handler_for(cfg)(m, cfg, data=None)
        out.append(Seed(name, packed(m.eval(), "auto")))
    return out


# ------------------------------------------------------------------------------------ container


def split(blob: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Header and section bytes of a well-formed file."""
    _, _, flags, hlen, _ = PRELUDE.unpack_from(blob, 0)
    text = blob[PRELUDE.size : PRELUDE.size + hlen]
    header = json.loads(zlib.decompress(text) if flags & FLAG_DEFLATE else text)
    base = PRELUDE.size + hlen
    return header, [blob[base + s["offset"] : base + s["offset"] + s["length"]] for s in header["sections"]]


def assemble(header: Any, sections: list[bytes], *, fix_table: bool = True, deflate: bool = False) -> bytes:
    """A file from parts with every checksum recomputed (the section table too, unless ``fix_table``
    is False), so only the mutation is left to find."""
    if fix_table and isinstance(header, dict) and isinstance(header.get("sections"), list):
        off = 0
        table = header["sections"]
        for i, data in enumerate(sections):
            if i < len(table) and isinstance(table[i], dict):
                table[i].update(offset=off, length=len(data), crc32=zlib.crc32(data))
            off += len(data)
        header["data_bytes"] = off
    text = json.dumps(header, allow_nan=True).encode()
    flags = 0
    if deflate:
        text, flags = zlib.compress(text, 6), FLAG_DEFLATE
    return PRELUDE.pack(MAGIC, VERSION, flags, len(text), zlib.crc32(text)) + text + b"".join(sections)


# ------------------------------------------------------------------------------------ mutations

_INTS = [0, 1, -1, 2, 3, 7, 8, 15, 16, 24, 25, 31, 32, 33, 63, 64, 65, 255, 256, 4096, 4097, 1 << 16, 1 << 20,
         10**6, 1 << 24, (1 << 24) + 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 53, (1 << 63) - 1, 1 << 63,
         1 << 64, -(1 << 63), 10**30, 10**400]


def _weird(rng: random.Random) -> Any:
    """A value of a random type, often an edge of some range."""
    kind = rng.randrange(12)
    if kind < 4:
        return rng.choice(_INTS)
    return [None, True, False, 0.5, -0.0, 1e308, float("nan"), float("inf"), "", "x" * rng.choice([1, 100, 5000]),
            [], {}, [1, 2], {"a": 1}, ["float16"], [[[]]], "float16", "huffman", "fixed", "meta", "rans"][rng.randrange(21)]


def _tweak_int(v: int, rng: random.Random) -> int:
    op = rng.randrange(8)
    if op == 0:
        return v + rng.choice([-1, 1])
    if op == 1:
        return v * rng.choice([2, 8, 1000, 10**6])
    if op == 2:
        return -v - 1
    if op == 3:
        return v // 2
    if op == 4:
        return rng.choice(_INTS)
    if op == 5:
        return v ^ (1 << rng.randrange(64))
    if op == 6:
        return 0
    return v + rng.choice([(1 << 31), 1 << 40])


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every (container, key) path in a JSON tree (lists and dicts)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(path + (k,))
            out.extend(_nodes(v, path + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:64]):
            out.append(path + (i,))
            out.extend(_nodes(v, path + (i,)))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _mutate_field(h: dict, rng: random.Random, focus: tuple = ()) -> str:
    root = _get(h, focus) if focus else h
    paths = [focus + p for p in _nodes(root)]
    if not paths:
        return "none"
    path = rng.choice(paths)
    parent, key = _get(h, path[:-1]), path[-1]
    old = parent[key]
    op = rng.randrange(10)
    if op < 4 and isinstance(old, int) and not isinstance(old, bool):
        parent[key] = _tweak_int(old, rng)
    elif op == 4 and isinstance(parent, dict):
        del parent[key]
        return f"delete {path}"
    elif op == 5 and isinstance(parent, dict):
        parent[f"extra{rng.randrange(9)}"] = _weird(rng)
        return f"add key beside {path}"
    elif op == 6 and isinstance(old, list) and old:
        if rng.random() < 0.5:
            old.append(copy.deepcopy(rng.choice(old)))
        else:
            old.pop(rng.randrange(len(old)))
        return f"resize list {path}"
    elif op == 7 and isinstance(old, list) and len(old) > 1:
        rng.shuffle(old)
        return f"shuffle {path}"
    else:
        parent[key] = _weird(rng)
    return f"set {path}"


def _tensor_entries(h: dict) -> list[dict]:
    t = h.get("tensors")
    return [e for e in t if isinstance(e, dict)] if isinstance(t, list) else []


def _mutate_tensor(h: dict, sections: list[bytes], rng: random.Random) -> str:
    entries = _tensor_entries(h)
    if not entries:
        return "none"
    e = rng.choice(entries)
    op = rng.randrange(6)
    if op == 0 and isinstance(e.get("shape"), list):  # shape, with kept/counts following sometimes
        shape = e["shape"]
        if shape and rng.random() < 0.7:
            i = rng.randrange(len(shape))
            shape[i] = _tweak_int(shape[i], rng) if isinstance(shape[i], int) else 3
        else:
            shape.append(rng.choice([1, 2, 1 << 20]))
        if rng.random() < 0.5 and all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape):
            n = 1
            for d in shape:
                n *= d
            for key in ("kept", "nonzeros"):
                e[key] = min(n, e.get(key, n)) if rng.random() < 0.5 else n
            for p in (e.get("parts") or {}).values():
                if isinstance(p, dict) and rng.random() < 0.5:
                    p["count"] = n
        return f"shape of {e.get('name')}"
    if op == 1:  # bit widths
        for p in (e.get("parts") or {}).values():
            if isinstance(p, dict) and "bits" in p and rng.random() < 0.7:
                p["bits"] = rng.choice([0, 1, 2, 3, 23, 24, 25, 32, 33, 63, 64, 65])
        if isinstance(e.get("quant"), dict) and "bits" in e["quant"]:
            e["quant"]["bits"] = rng.choice([0, 1, 8, 24, 25, 64])
        return f"bits of {e.get('name')}"
    if op == 2:  # codebook size or section of a part
        parts = e.get("parts") or {}
        if isinstance(parts, dict) and parts:
            p = parts[rng.choice(list(parts))]
            if isinstance(p, dict):
                key = rng.choice(["count", "section", "dtype", "coding", "block", "coded_bits", "entropy_bits"])
                p[key] = _weird(rng) if rng.random() < 0.6 else (_tweak_int(p[key], rng) if isinstance(p.get(key), int) else None)
        return f"part of {e.get('name')}"
    if op == 3:  # encoding swap
        e["encoding"] = rng.choice(["raw", "sparse", "codebook", "sparse_codebook", "affine", "affine_zp", "binary", "ternary", "cast"])
        return f"encoding of {e.get('name')}"
    if op == 4 and len(entries) > 1:  # swap two tensors' parts
        other = rng.choice(entries)
        e["parts"], other["parts"] = other.get("parts"), e.get("parts")
        return "swap parts"
    return _mutate_field(h, rng, ("tensors", h["tensors"].index(e)) if e in h.get("tensors", []) else ())


def _huffman_sections(h: dict, coding: str = "huffman") -> list[int]:
    out = []
    for e in _tensor_entries(h):
        parts = e.get("parts")
        if isinstance(parts, dict):
            for p in parts.values():
                if isinstance(p, dict) and p.get("coding") == coding and isinstance(p.get("section"), int):
                    out.append(p["section"])
    return out


def _mutate_rans_head(i: int, sections: list[bytes], rng: random.Random) -> str:
    """The head byte (precision, symbol-set mode, reserved bit) or bits of the table that follows it
    (exp-Golomb codes of K and the lane count, symbol set, frequencies, lane states) of rANS section ``i``."""
    data = bytearray(sections[i])
    op = rng.randrange(4)
    if op == 0:  # precision, possibly past the limit
        data[0] = (data[0] & 0xE0) | rng.choice([0, 1, 2, 15, 16, 20, 21, 31])
        what = "precision"
    elif op == 1:  # symbol-set mode 0..3 and the reserved bit
        data[0] = (data[0] & 0x1F) | (rng.randrange(8) << 5)
        what = "mode"
    elif op == 2 and len(data) > 1:  # a bit of the table's first bytes
        for _ in range(rng.choice([1, 1, 2, 4])):
            j = 1 + rng.randrange(min(len(data) - 1, 24))
            data[j] ^= 1 << rng.randrange(8)
        what = "table bits"
    else:  # zeros or ones over the start of the table (huge exp-Golomb codes, K = 0 ...)
        j = 1 + rng.randrange(max(1, min(len(data) - 1, 8)))
        run = rng.choice([1, 2, 4])
        data[j : j + run] = (b"\0" if rng.random() < 0.5 else b"\xff") * len(data[j : j + run])
        what = "table run"
    sections[i] = bytes(data)
    return f"rans head {what} of section {i}"


def _mutate_stream_head(h: dict, sections: list[bytes], rng: random.Random) -> str:
    ranses = [i for i in _huffman_sections(h, "rans") if 0 <= i < len(sections) and sections[i]]
    idx = [i for i in _huffman_sections(h) if 0 <= i < len(sections) and len(sections[i]) >= _HUFF_HEAD.size]
    if ranses and (not idx or rng.random() < 0.5):
        return _mutate_rans_head(rng.choice(ranses), sections, rng)
    if not idx:
        return _mutate_payload(h, sections, rng)
    i = rng.choice(idx)
    values = dict(zip(_HEAD_FIELDS, _HUFF_HEAD.unpack_from(sections[i], 0)))
    name = rng.choice(_HEAD_FIELDS)
    width = _HEAD_WIDTH[name]
    if name == "sw" and rng.random() < 0.5:
        new = rng.choice([33, 40, 50, 63, 64])
    elif name == "sync_every" and rng.random() < 0.5:
        new = rng.choice([1, 2, 4097, 1 << 16, 1 << 24])
    else:
        new = _tweak_int(values[name], rng)
    values[name] = new % (1 << width)
    sections[i] = _HUFF_HEAD.pack(*values.values()) + sections[i][_HUFF_HEAD.size :]
    return f"stream head {name} of section {i}"


def _mutate_payload(h: dict, sections: list[bytes], rng: random.Random) -> str:
    if not sections:
        return "none"
    i = rng.randrange(len(sections))
    data = bytearray(sections[i])
    op = rng.randrange(5)
    if op == 0 and data:
        for _ in range(rng.choice([1, 1, 2, 8])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1 and data:
        del data[rng.randrange(len(data)) :]
    elif op == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 64])))
    elif op == 3 and data:
        a = rng.randrange(len(data))
        data[a : a + rng.choice([1, 8, 64])] = b"\xff" * len(data[a : a + 8])
    else:
        data = bytearray(rng.randrange(256) for _ in range(len(data)))
    sections[i] = bytes(data)
    return f"payload of section {i}"


_MODEL_ATTACKS: list[Callable[[random.Random], dict]] = [
    lambda r: {"zoo": "vit_tiny", "args": {"depth": r.choice([1 << 20, 1 << 30, 1 << 32, 1 << 40])}},
    lambda r: {"zoo": "mlp", "args": {"in_features": 64, "hidden": [r.choice([10**6, 1 << 20, 1 << 24])], "num_classes": 10}},
    lambda r: {"zoo": "mlp", "args": {"in_features": 64, "hidden": [16] * r.choice([100, 4096, 5000]), "num_classes": 10}},
    lambda r: {"zoo": "resnet_small", "args": {"widths": [1 << 16] * 3, "depths": [1 << 20] * 3}},
    lambda r: {"zoo": "lenet5", "args": {"input_size": r.choice([1 << 16, 1 << 31, 0, -5])}},
    lambda r: {"zoo": "mlp", "args": {"in_features": r.choice([-1, 0, 10**6, "64", None, [64]])}},
    lambda r: {"zoo": r.choice(["nonexistent", "", "x" * 200, "resnet50"]), "args": {}},
    lambda r: {"zoo": "mlp", "args": {"bogus": 1}},
]

_EDIT_ATTACKS: list[Callable[[random.Random], dict]] = [
    lambda r: {"path": "fc1", "type": "hashed_linear", "args": {"in_features": r.choice([1 << 15, 1 << 20, 1 << 24]),
                                                               "out_features": 16, "buckets": 4, "bias": True, "sign_hash": True, "seed": 0}},
    lambda r: {"path": "fc1", "type": "lowrank_linear", "args": {"in_features": 64, "out_features": 16, "rank": r.choice([1 << 20, 10**6, -1])}},
    lambda r: {"path": "fc1", "type": "torch.nn.Linear", "args": {"in_features": 1 << 20, "out_features": 1 << 10, "bias": True}},
    lambda r: {"path": r.choice(["fc9", "fc1.x.y", "", "..", "fc1." * 300]), "type": "torch.nn.Linear", "args": {}},
    lambda r: {"path": "fc1", "type": r.choice(["mystery", "torch.nn.Module", "os.system"]), "args": {}},
    lambda r: {"path": "fc1", "type": "circulant_linear", "args": {"in_features": 1 << 24, "out_features": 1 << 24}},
]


def _mutate_model(h: dict, sections: list[bytes], rng: random.Random) -> str:
    if rng.random() < 0.6:
        h["model"] = rng.choice(_MODEL_ATTACKS)(rng)
        return f"model {json.dumps(h['model'])[:80]}"
    if isinstance(h.get("model"), dict) and isinstance(h["model"].get("args"), dict) and h["model"]["args"]:
        return _mutate_field(h, rng, ("model", "args"))
    return _mutate_field(h, rng, ("model",)) if isinstance(h.get("model"), dict) else "none"


def _mutate_edits(h: dict, sections: list[bytes], rng: random.Random) -> str:
    edits = h.setdefault("edits", [])
    if not isinstance(edits, list):
        h["edits"] = edits = []
    if edits and rng.random() < 0.5:
        return _mutate_field(h, rng, ("edits",))
    edits.insert(rng.randrange(len(edits) + 1), rng.choice(_EDIT_ATTACKS)(rng))
    return f"edit {json.dumps(edits[-1])[:80]}"


def _mutate_other(h: dict, sections: list[bytes], rng: random.Random) -> str:
    key = rng.choice(["act_quant", "metadata", "sections", "format", "data_bytes"])
    if key in h and isinstance(h[key], (dict, list)) and h[key] and rng.random() < 0.7:
        return _mutate_field(h, rng, (key,))
    h[key] = _weird(rng)
    return f"set {key}"


MUTATORS: dict[str, tuple[float, Callable[[dict, list[bytes], random.Random], str]]] = {
    "field": (3.0, lambda h, s, r: _mutate_field(h, r)),
    "tensor": (4.0, _mutate_tensor),
    "stream_head": (3.0, _mutate_stream_head),
    "payload": (2.0, _mutate_payload),
    "model": (1.5, _mutate_model),
    "edits": (1.5, _mutate_edits),
    "other": (1.0, _mutate_other),
}


def mutate(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A mutated copy of the well-formed file ``blob`` (checksums recomputed) and what was done."""
    header, sections = split(blob)
    names, weights = zip(*((k, w) for k, (w, _) in MUTATORS.items()))
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choices(names, weights)[0]
        try:
            done.append(f"{kind}: {MUTATORS[kind][1](header, sections, rng)}")
        except (AttributeError, TypeError, KeyError, ValueError, IndexError):  # an earlier mutation broke the shape it expects
            done.append(f"{kind}: none (the header no longer has that structure)")
    fix = rng.random() < 0.95
    return assemble(header, sections, fix_table=fix, deflate=rng.random() < 0.3), "; ".join(done)


# ------------------------------------------------------------------------------------------ cases


def _alarm(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return old


def _disarm(old) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def _cli(argv: list[str]) -> str:
    """Run the CLI in-process; ``ok`` or the error class by exit code; stderr must be one line."""
    import contextlib
    import io

    from ..cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    text = err.getvalue().strip()
    if code == 0:
        return "ok"
    if len(text.splitlines()) != 1 or not text.startswith("netshrink: error:") or "Traceback" in text:
        raise AssertionError(f"CLI {argv[0]} exit {code} without a one-line error: {text[:300]!r}")
    return f"exit {code}"


def targets(path: Path, out_dir: Path, cli_eval: bool) -> dict[str, Callable[[], Any]]:
    from .nsk import load, read_info, unpack_to_safetensors

    t: dict[str, Callable[[], Any]] = {
        "read_info": lambda: read_info(path),
        "load": lambda: load(path),
        "load_restore": lambda: load(path, restore=True),
        "unpack": lambda: unpack_to_safetensors(path, out_dir / "out.safetensors"),
        "cli_info": lambda: _cli(["info", str(path)]),
    }
    if cli_eval:
        t["cli_eval"] = lambda: _cli(["eval", str(path), "--data", "digits", "--runs", "20", "--batch-sizes", "1", "--threads", "1"])
    return t


@dataclass
class CaseResult:
    outcomes: dict[str, str]
    seconds: float
    description: str
    failure: str | None = None  # the traceback of a crash or the note of a hang


def run_case(blob: bytes, description: str, work: Path, *, time_limit: float = 10.0, cli_eval: bool = False) -> CaseResult:
    """Write ``blob`` and read it through every target; outcomes by target."""
    path = work / "case.nsk"
    path.write_bytes(blob)
    outcomes: dict[str, str] = {}
    failure = None
    t0 = time.perf_counter()
    for name, fn in targets(path, work, cli_eval).items():
        old = _alarm(time_limit)
        try:
            res = fn()
            outcomes[name] = res if isinstance(res, str) else "ok"
        except Hang as exc:
            outcomes[name] = "hang"
            failure = f"{name}: {exc}"
        except NetshrinkError as exc:
            outcomes[name] = type(exc).__name__
        except Exception:  # noqa: BLE001 - any other exception is the crash this fuzzer looks for
            outcomes[name] = "crash"
            failure = f"{name}: {traceback.format_exc(limit=6)}"
        finally:
            _disarm(old)
    return CaseResult(outcomes, time.perf_counter() - t0, description, failure)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
