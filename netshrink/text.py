"""A natural-language text corpus from a package registry, its fixed splits, and tokenizers.

The corpus is the reStructuredText source of the Python 3.11 documentation (tutorial, library and
language reference, HOWTOs: ~11 MB of English prose with code examples) as Debian ships it in
``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources/**/*.txt``). The ``.deb`` is fetched with
``apt-get download python3.11-doc=VERSION`` (never installed), its sha256 is verified *before* anything
in it is read, and the archive is parsed here (``ar`` container, ``data.tar.xz``) without extracting to
disk. ``$NETSHRINK_TEXT`` or ``source=`` may name a local copy of that ``.deb`` (checked the same way) or
a folder of ``.txt`` files (read as given, for users' own text).

Splits are fixed by document: a file goes to test when the first byte of ``sha256(path)`` is below 13,
to validation when below 26, else to train (about 5% / 5% / 90%), so the splits never share a document.

Tokenizers: :class:`ByteTokenizer` (256 byte values) and a byte-level BPE trained on the train split
with the ``tokenizers`` package (Sennrich et al., ACL 2016; byte-level as in GPT-2, Radford et al. 2019).
The token streams and the tokenizer are cached (``$NETSHRINK_CACHE``), keyed by the source's sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._fileio import atomic_write_bytes, cache_root
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEXT_PACKAGE = "python3.11-doc"
TEXT_VERSION = "3.11.2-6+deb12u8"
TEXT_SHA256 = "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"
TEXT_PREFIX = "./usr/share/doc/python3.11/html/_sources/"
ENV_TEXT = "NETSHRINK_TEXT"
SPLITS = ("train", "val", "test")
_MAX_MEMBER = 64 << 20  # no single archive member may be larger than this


def split_of(path: str) -> str:
    """The fixed split of a document, from the first byte of ``sha256(path)``."""
    b = hashlib.sha256(path.encode("utf-8")).digest()[0]
    return "test" if b < 13 else "val" if b < 26 else "train"


# ----------------------------------------------------------------------------------- the .deb file


def _ar_members(blob: bytes, what: str) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a .deb), every length checked against the file."""
    if not blob.startswith(b"!<arch>\n"):
        raise DataError(f"{what}: not a Debian package (no ar magic)")
    out, pos = {}, 8
    while pos < len(blob):
        if pos + 60 > len(blob):
            raise DataError(f"{what}: truncated ar header at offset {pos}")
        head = blob[pos : pos + 60]
        if head[58:60] != b"`\n":
            raise DataError(f"{what}: corrupt ar header at offset {pos}")
        name = head[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(head[48:58].decode("ascii").strip())
        except ValueError:
            raise DataError(f"{what}: bad member size at offset {pos}") from None
        start = pos + 60
        if size < 0 or start + size > len(blob):
            raise DataError(f"{what}: member {name!r} runs past the end of the file")
        out[name] = blob[start : start + size]
        pos = start + size + (size & 1)
    return out


def deb_texts(blob: bytes, what: str = TEXT_PACKAGE) -> dict[str, str]:
    """The documentation sources in the .deb ``blob``: ``{relative path: text}``, sorted by path."""
    members = _ar_members(blob, what)
    data = members.get("data.tar.xz")
    if data is None:
        raise DataError(f"{what}: no data.tar.xz member (members: {', '.join(members)})")
    texts: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
            for info in tar:
                if not (info.isfile() and info.name.startswith(TEXT_PREFIX) and info.name.endswith(".txt")):
                    continue
                if info.size > _MAX_MEMBER:
                    raise DataError(f"{what}: member {info.name} is implausibly large ({info.size} bytes)")
                f = tar.extractfile(info)
                assert f is not None
                texts[info.name[len(TEXT_PREFIX) :]] = f.read().decode("utf-8", "replace")
    except (tarfile.TarError, lzma.LZMAError, EOFError) as err:
        raise DataError(f"{what}: unreadable data.tar.xz ({err})") from None
    if not texts:
        raise DataError(f"{what}: no documentation sources under {TEXT_PREFIX}")
    return dict(sorted(texts.items()))


def folder_texts(folder: Path) -> dict[str, str]:
    """Every ``*.txt`` file under ``folder``: ``{relative path: text}``."""
    texts = {p.relative_to(folder).as_posix(): p.read_text("utf-8", "replace") for p in sorted(folder.rglob("*.txt")) if p.is_file()}
    if not texts:
        raise DataError(f"{folder}: no .txt files")
    return texts


def fetch_deb(timeout: float = 600.0) -> bytes:
    """``apt-get download python3.11-doc=VERSION`` into a temporary folder; the bytes (not yet verified)."""
    spec = f"{TEXT_PACKAGE}={TEXT_VERSION}"
    with tempfile.TemporaryDirectory(prefix="netshrink-apt-") as tmp:
        log.info("fetching the text corpus: apt-get download %s", spec)
        try:
            proc = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DataError(f"could not fetch {spec}: apt-get download took over {timeout:.0f} s") from None
        except OSError as err:
            raise DataError(f"could not fetch {spec}: cannot run apt-get ({err}); set {ENV_TEXT} to the .deb") from None
        debs = sorted(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            raise DataError(f"could not fetch {spec}: {lines[-1] if lines else 'no .deb'}; set {ENV_TEXT} to the .deb")
        return debs[0].read_bytes()


def verify(blob: bytes, what: str) -> None:
    got = hashlib.sha256(blob).hexdigest()
    if got != TEXT_SHA256:
        raise DataError(f"checksum mismatch for {what}: expected sha256 {TEXT_SHA256}, got {got}")


# ------------------------------------------------------------------------------------ tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", "replace")

    def to_json(self) -> str:
        return json.dumps({"type": "byte"})


class BpeTokenizer:
    """A byte-level BPE from the ``tokenizers`` package (trained by :func:`train_bpe`)."""

    name = "bpe"

    def __init__(self, tok: Any):
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except Exception as err:  # the tokenizers package raises its own exception type
            raise DataError(f"unreadable tokenizer: {err}") from None


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("tokenizer", "'bpe' needs the tokenizers package (pip install 'netshrink[text]')") from None
    return tokenizers


def train_bpe(texts: list[str], vocab_size: int = 4096) -> BpeTokenizer:
    """A byte-level BPE with ``vocab_size`` tokens trained on ``texts`` (Sennrich et al. 2016)."""
    if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 65535:
        raise ConfigError("vocab_size", f"must be an integer in [257, 65535], got {vocab_size!r}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)


def make_tokenizer(kind: str, train_texts: list[str], vocab_size: int) -> ByteTokenizer | BpeTokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(train_texts, vocab_size)
    raise ConfigError("tokenizer", f"expected 'byte' or 'bpe', got {kind!r}")


def load_tokenizer(text: str) -> ByteTokenizer | BpeTokenizer:
    try:
        if json.loads(text).get("type") == "byte":
            return ByteTokenizer()
    except (ValueError, AttributeError):
        raise DataError("unreadable tokenizer: not JSON") from None
    return BpeTokenizer.from_json(text)


# ------------------------------------------------------------------------------------ the corpus


@dataclass
class TextCorpus:
    """Token streams of the train / validation / test splits, their tokenizer and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    tokenizer: Any
    source: str
    documents: dict[str, int] = field(default_factory=dict)
    text_bytes: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ConfigError("split", f"expected one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)

    def chunks(self, name: str, seq_len: int, max_chunks: int | None = None, stride: int | None = None) -> "TokenChunks":
        """Windows of ``seq_len`` tokens of one split (see :class:`TokenChunks`)."""
        return TokenChunks(self.split(name), seq_len, max_chunks=max_chunks, stride=stride)


class TokenChunks(Dataset):
    """Consecutive windows of ``seq_len`` tokens of a token stream (``stride`` apart; default
    non-overlapping), each item a bare ``(seq_len,)`` LongTensor: a batch is ``(B, seq_len)`` ids, which
    ``language_modeling()`` shifts into targets."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, *, max_chunks: int | None = None, stride: int | None = None):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigError("seq_len", f"must be an integer >= 2, got {seq_len!r}")
        stride = seq_len if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise ConfigError("stride", f"must be a positive integer, got {stride!r}")
        if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
            raise ConfigError("max_chunks", f"must be a positive integer or null, got {max_chunks!r}")
        if tokens.dim() != 1 or tokens.numel() < seq_len:
            raise DataError(f"a token stream of {tokens.numel()} tokens is shorter than one window of {seq_len}")
        self.tokens, self.seq_len, self.stride = tokens.long(), seq_len, stride
        n = (tokens.numel() - seq_len) // stride + 1
        self.n = n if max_chunks is None else min(n, max_chunks)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        return self.tokens[i * self.stride : i * self.stride + self.seq_len]


def _docs_by_split(texts: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path, text in texts.items():
        out[split_of(path)].append(text)
    return out


def corpus_from_texts(texts: dict[str, str], tokenizer: str = "bpe", vocab_size: int = 4096, source: str = "texts") -> TextCorpus:
    """Split ``{path: text}`` by document, train the tokenizer on the train split, encode every split."""
    docs = _docs_by_split(texts)
    for s in SPLITS:
        if not docs[s]:
            raise DataError(f"{source}: no document falls into the {s} split ({len(texts)} documents in all)")
    tok = make_tokenizer(tokenizer, docs["train"], vocab_size)
    streams = {}
    for s in SPLITS:
        enc = tok.encode_batch(docs[s]) if hasattr(tok, "encode_batch") else [tok.encode(d) for d in docs[s]]
        streams[s] = torch.tensor([i for ids in enc for i in ids], dtype=torch.long)
    return TextCorpus(
        streams["train"], streams["val"], streams["test"], tok, source,
        documents={s: len(docs[s]) for s in SPLITS},
        text_bytes={s: sum(len(d.encode("utf-8")) for d in docs[s]) for s in SPLITS},
    )


def _cache_path(cache_dir: Path, tokenizer: str, vocab_size: int) -> Path:
    key = f"{TEXT_SHA256[:16]}-{tokenizer}{vocab_size if tokenizer == 'bpe' else ''}"
    return cache_dir / "text" / f"pydoc311-{key}.npz"


def _read_cache(path: Path) -> TextCorpus | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            tok = load_tokenizer(str(z["tokenizer"]))
            meta = json.loads(str(z["meta"]))
            streams = {s: torch.from_numpy(z[s].astype(np.int64)) for s in SPLITS}
    except (OSError, KeyError, ValueError, DataError) as err:
        log.warning("ignoring unreadable text cache %s (%s); rebuilding it", path, err)
        return None
    if any(int(t.max()) >= tok.vocab_size or int(t.min()) < 0 for t in streams.values()):
        log.warning("ignoring malformed text cache %s; rebuilding it", path)
        return None
    return TextCorpus(streams["train"], streams["val"], streams["test"], tok, meta["source"], meta["documents"], meta["text_bytes"])


def _write_cache(path: Path, c: TextCorpus) -> None:
    buf = io.BytesIO()
    dtype = np.uint16 if c.tokenizer.vocab_size <= 65536 else np.int32
    meta = json.dumps({"source": c.source, "documents": c.documents, "text_bytes": c.text_bytes})
    np.savez(buf, tokenizer=np.array(c.tokenizer.to_json()), meta=np.array(meta), **{s: c.split(s).numpy().astype(dtype) for s in SPLITS})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as err:
        log.warning("could not write the text cache %s (%s); continuing without it", path, err)


def python_docs(
    cache_dir: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
) -> TextCorpus:
    """The Python 3.11 documentation corpus, split and tokenized (see the module docstring).

    Order: ``source`` or ``$NETSHRINK_TEXT`` (a .deb, sha256 verified, or a folder of .txt files, not
    cached); the cache; ``apt-get download`` (sha256 verified, then cached).
    """
    if tokenizer not in ("byte", "bpe"):
        raise ConfigError("tokenizer", f"expected 'byte' or 'bpe', got {tokenizer!r}")
    source = source if source is not None else os.environ.get(ENV_TEXT) or None
    if source is not None:
        p = Path(source).expanduser()
        if p.is_dir():
            return corpus_from_texts(folder_texts(p), tokenizer, vocab_size, source=str(p))
        try:
            blob = p.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read the text source {p}: {err.strerror or err}") from None
        verify(blob, str(p))
        return corpus_from_texts(deb_texts(blob, str(p)), tokenizer, vocab_size, source=f"{TEXT_PACKAGE}={TEXT_VERSION} ({p.name})")
    path = _cache_path(cache_root(cache_dir), tokenizer, vocab_size)
    if path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    blob = fetch_deb()
    verify(blob, f"{TEXT_PACKAGE}={TEXT_VERSION}")
    corpus = corpus_from_texts(deb_texts(blob), tokenizer, vocab_size, source=f"{TEXT_PACKAGE}={TEXT_VERSION} (Debian, sha256 {TEXT_SHA256[:12]}…)")
    _write_cache(path, corpus)
    return corpus


__all__ = [
    "ByteTokenizer",
    "BpeTokenizer",
    "TextCorpus",
    "TokenChunks",
    "corpus_from_texts",
    "deb_texts",
    "python_docs",
    "split_of",
    "train_bpe",
]
