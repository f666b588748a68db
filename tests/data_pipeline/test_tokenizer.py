"""The three tokenizer formats a Llama base can ship."""

import pytest
import sentencepiece as spm

from megafusion.data_pipeline.tokenizer import load_tokenizer
from megafusion.data_pipeline.tokenizer import write_byte_level_tiktoken as write_byte_tiktoken
from tests.inference.helpers import save_tiny_tokenizer


def test_tiktoken_tokenizer_model(tmp_path):
    path = write_byte_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "tiktoken"
    assert tok.encode("hi!") == [104, 105, 33]
    assert tok.decode(tok.encode("a red circle")) == "a red circle"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.prefix_ids) == (256, 257, 512, [256])
    assert tok.encode("<|begin_of_text|>") != [tok.bos_id]  # caption text never becomes a control token
    assert load_tokenizer(path).kind == "tiktoken"
    assert tok.eos_ids == [257] and tok.chat_template is None
    assert tok.decode([256, 104, 105, 257], skip_special_tokens=True) == "hi"
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_chat("hi")


def test_sentencepiece_tokenizer_model(tmp_path):
    lines = ["a handwritten digit seven", "the number three", "a red circle on the left"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=40, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece"
    assert tok.decode(tok.encode("the number three")) == "the number three"
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.prefix_ids == [1]
    assert tok.eos_ids == [2] and tok.chat_template is None
    assert tok.decode([1, *tok.encode("the number three"), 2], skip_special_tokens=True) == "the number three"


def test_hf_tokenizer_json_with_chat_template(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "hf" and tok.prefix_ids == [1] and tok.eos_ids == [2]
    assert tok.encode("w5 w6") == [5, 6]
    assert tok.decode([1, 5, 6, 2], skip_special_tokens=True) == "w5 w6"
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_chat("w5")
    tok.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8{% endfor %}"
    assert tok.encode_chat("w5 w6") == [7, 5, 6, 8]  # the template's text only: no BOS added on top


@pytest.mark.slow
def test_hf_tokenizer_json(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok.kind == "hf" and tok.vocab_size == 49152
    assert tok.prefix_ids == []  # SmolLM2's tokenizer adds no BOS of its own
    assert tok.decode(tok.encode("a handwritten digit 7")) == "a handwritten digit 7"
    assert tok.chat_template is not None and tok.eos_ids == [tok.eos_id]


@pytest.mark.slow
def test_gguf_file_tokenizer_equals_the_converted_directory(smollm2_gguf, smollm2_dir):
    """A .gguf base: its embedded tokenizer (read by transformers from the file's directory) is the one the
    converted HF directory ships."""
    from_gguf, from_dir = load_tokenizer(smollm2_gguf), load_tokenizer(smollm2_dir)
    assert from_gguf.kind == "hf" and from_gguf.vocab_size == from_dir.vocab_size
    text = "a handwritten digit 7, then a red circle"
    assert from_gguf.encode(text) == from_dir.encode(text)
    assert (from_gguf.prefix_ids, from_gguf.eos_ids) == (from_dir.prefix_ids, from_dir.eos_ids)
    assert from_gguf.encode_chat("What is 2+2?") == from_dir.encode_chat("What is 2+2?")


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="neither a tiktoken BPE file nor a sentencepiece model"):
        load_tokenizer(tmp_path)
