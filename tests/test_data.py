import json

import pytest
import torch
from conftest import TEXT, tiny_tokenizer

from llmsqueeze import LlmsqueezeError
from llmsqueeze.data import calibration_batches, load_calibration_texts


def test_txt_jsonl_and_datasets_dir(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["the of", "and to"]) + "\n")
    assert load_calibration_texts(str(tmp_path / "a.txt")) == [TEXT]
    assert load_calibration_texts(str(tmp_path / "b.jsonl")) == ["the of", "and to"]
    from datasets import Dataset

    Dataset.from_dict({"text": ["in a", "is was"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_calibration_texts(str(tmp_path / "ds")) == ["in a", "is was"]


def test_bad_sources(tmp_path):
    with pytest.raises(LlmsqueezeError, match="no such file, and not one of wikitext2"):
        load_calibration_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(LlmsqueezeError, match="line 1: expected a JSON object with a 'text' field"):
        load_calibration_texts(str(tmp_path / "bad.jsonl"))


def test_batches_reproducible_and_shaped(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    tok = tiny_tokenizer()
    a = calibration_batches(tok, str(tmp_path / "a.txt"), n_samples=8, seq_len=32, seed=0)
    b = calibration_batches(tok, str(tmp_path / "a.txt"), n_samples=8, seq_len=32, seed=0)
    c = calibration_batches(tok, str(tmp_path / "a.txt"), n_samples=8, seq_len=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(LlmsqueezeError, match="fewer than one sample"):
        calibration_batches(tok, ["the of and"], n_samples=1, seq_len=32)
