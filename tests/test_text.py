"""The text corpus: the .deb reader, checksum before reading, fixed document splits, tokenizers, windows."""

import io
import tarfile

import pytest
import torch

from netshrink.errors import ConfigError, DataError
from netshrink.text import (
    TEXT_PREFIX,
    ByteTokenizer,
    TokenChunks,
    corpus_from_texts,
    deb_texts,
    python_docs,
    split_of,
    train_bpe,
)


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += head + data + (b"\n" if len(data) % 2 else b"")
    return out


def _deb(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buf.getvalue()})


def test_deb_reader_takes_only_the_doc_sources():
    blob = _deb({TEXT_PREFIX + "library/os.rst.txt": "The os module.", TEXT_PREFIX + "x.html": "<p>", "./usr/bin/python": "ELF"})
    assert deb_texts(blob) == {"library/os.rst.txt": "The os module."}


def test_deb_reader_rejects_truncated_and_foreign_files():
    blob = _deb({TEXT_PREFIX + "a.txt": "text " * 100})
    with pytest.raises(DataError, match="runs past the end"):
        deb_texts(blob[:-40])
    with pytest.raises(DataError, match="not a Debian package"):
        deb_texts(b"PK\x03\x04 a zip")
    with pytest.raises(DataError, match="no data.tar.xz"):
        deb_texts(_ar({"debian-binary": b"2.0\n"}))


def test_checksum_is_verified_before_reading(tmp_path):
    fake = tmp_path / "python3.11-doc.deb"
    fake.write_bytes(_deb({TEXT_PREFIX + "a.txt": "hello"}))
    with pytest.raises(DataError, match="checksum mismatch"):
        python_docs(source=fake)


def test_splits_are_fixed_by_document_and_disjoint():
    texts = {f"doc{i}.txt": f"document number {i} says hello. " * 20 for i in range(120)}
    assert split_of("doc1.txt") == split_of("doc1.txt")
    c = corpus_from_texts(texts, tokenizer="byte")
    assert sum(c.documents.values()) == 120 and all(c.documents[s] > 0 for s in ("train", "val", "test"))
    assert c.text_bytes["train"] + c.text_bytes["val"] + c.text_bytes["test"] == sum(len(t) for t in texts.values())
    assert c.train.numel() == c.text_bytes["train"]  # bytes are tokens
    test_docs = {p for p in texts if split_of(p) == "test"}
    assert ByteTokenizer().decode(c.test[: len(texts[sorted(test_docs)[0]])]) == texts[sorted(test_docs)[0]]


def test_folder_source_and_bpe_round_trip(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog. " * 10)
    c = python_docs(source=tmp_path, tokenizer="bpe", vocab_size=300)
    assert c.tokenizer.vocab_size <= 300
    text = "The quick brown fox jumps."
    assert c.tokenizer.decode(c.tokenizer.encode(text)) == text
    assert c.train.numel() < c.text_bytes["train"]  # merges shorten the stream
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)


def test_windows_are_bare_token_tensors():
    ids = torch.arange(1000)
    w = TokenChunks(ids, 100, stride=50)
    assert len(w) == 19 and torch.equal(w[1], torch.arange(50, 150))
    assert len(TokenChunks(ids, 100, max_chunks=3)) == 3
    with pytest.raises(DataError, match="shorter than one window"):
        TokenChunks(torch.arange(10), 100)
    with pytest.raises(ConfigError, match="seq_len"):
        TokenChunks(ids, 1)
    with pytest.raises(ConfigError, match="max_chunks"):
        TokenChunks(ids, 100, max_chunks=-3)
