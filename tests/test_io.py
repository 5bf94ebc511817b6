"""tempering.io: the one JSONL writer, the lenient JSON reader and what a content hash covers."""

from __future__ import annotations

import json

import pytest

from tempering import TemperingError
from tempering.io import jsonl_line, read_json, read_json_or_none, read_jsonl, write_jsonl


def test_jsonl_writer_keeps_unicode_and_survives_lone_surrogates(tmp_path):
    rows = [{"t": "héllo ☃"}, {"t": "bad \ud800 half"}, {"n": 1}]
    path = tmp_path / "x.jsonl"
    assert write_jsonl(path, rows) == 3
    raw = path.read_bytes()
    assert "héllo ☃".encode() in raw and b"\\ud800" in raw and b"\r\n" not in raw
    assert read_jsonl(path) == rows  # nothing lost: the escaped row reads back the same
    assert jsonl_line({"a": 1}) == '{"a": 1}\n'
    assert not list(tmp_path.glob(".tmp-*"))


def test_lenient_reader_gives_none_and_the_strict_one_names_the_file(tmp_path):
    good, bad, missing = tmp_path / "g.json", tmp_path / "b.json", tmp_path / "m.json"
    good.write_text(json.dumps({"a": 1}))
    bad.write_text("{broken")
    assert read_json_or_none(good) == {"a": 1}
    assert read_json_or_none(bad) is None and read_json_or_none(missing) is None
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xff"}')
    assert read_json_or_none(tmp_path / "latin.json") is None
    with pytest.raises(TemperingError, match=r"b\.json: line 1: invalid JSON"):
        read_json(bad)


def test_a_model_folders_hash_is_its_weights_config_and_tokenizer(tmp_path):
    """Model cards (prose for people: export's quotes timings) and meta.json are not a model's
    content; in any other folder a README.md is."""
    from tempering.io import hash_path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    before = hash_path(model)
    (model / "README.md").write_text("---\nbase_model: /some/clone/models/base\n---\n")
    (model / "model_card.md").write_text("tokens_per_s: 1234.5\n")
    (model / "meta.json").write_text("{}")
    assert hash_path(model) == before
    (model / "model.safetensors").write_bytes(b"other weights")
    assert hash_path(model) != before
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text("{}\n")
    plain = hash_path(data)
    (data / "README.md").write_text("notes\n")
    assert hash_path(data) != plain
