"""The three tokenizer formats a Llama base can ship."""

import pytest
import sentencepiece as spm

from megafusion.data_pipeline.tokenizer import load_tokenizer
from megafusion.data_pipeline.tokenizer import write_byte_level_tiktoken as write_byte_tiktoken


def test_tiktoken_tokenizer_model(tmp_path):
    path = write_byte_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "tiktoken"
    assert tok.encode("hi!") == [104, 105, 33]
    assert tok.decode(tok.encode("a red circle")) == "a red circle"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.prefix_ids) == (256, 257, 512, [256])
    assert tok.encode("<|begin_of_text|>") != [tok.bos_id]  # caption text never becomes a control token
    assert load_tokenizer(path).kind == "tiktoken"


def test_sentencepiece_tokenizer_model(tmp_path):
    lines = ["a handwritten digit seven", "the number three", "a red circle on the left"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=40, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece"
    assert tok.decode(tok.encode("the number three")) == "the number three"
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.prefix_ids == [1]


@pytest.mark.slow
def test_hf_tokenizer_json(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok.kind == "hf" and tok.vocab_size == 49152
    assert tok.prefix_ids == []  # SmolLM2's tokenizer adds no BOS of its own
    assert tok.decode(tok.encode("a handwritten digit 7")) == "a handwritten digit 7"


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="neither a tiktoken BPE file nor a sentencepiece model"):
        load_tokenizer(tmp_path)
