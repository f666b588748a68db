"""Caption tokenizers: whichever the base model ships, behind one small interface.

- HF `tokenizer.json` (SmolLM2, most converted checkpoints): transformers' AutoTokenizer.
- tiktoken-format `tokenizer.model` (Llama-3's original release): tiktoken with Llama-3's split pattern.
- sentencepiece `tokenizer.model` (Llama-2): sentencepiece.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Llama-3's pre-tokenizer split pattern (from its published tokenizer definition).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
LLAMA3_NAMED_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)


class TextTokenizer(Protocol):
    kind: str
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    # What the tokenizer itself puts before a text (BOS for Llama-2/3, nothing for SmolLM2): documents in training
    # start with it, so prompts encoded the same way at inference see the same context.
    prefix_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class HFTokenizer:
    path: str
    kind: str = "hf"

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.path)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        self.prefix_ids = list(self._tok("", add_special_tokens=True)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


@dataclass
class TiktokenTokenizer:
    path: str
    kind: str = "tiktoken"

    def __post_init__(self) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(self.path)
        n = len(ranks)
        names = list(LLAMA3_NAMED_SPECIAL) + [
            f"<|reserved_special_token_{i}|>" for i in range(2, LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIAL) + 2)
        ]
        special = {name: n + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(Path(self.path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=special)
        self.bos_id = special["<|begin_of_text|>"]
        self.eos_id = special["<|end_of_text|>"]
        self.vocab_size = n + len(special)
        self.prefix_ids = [self.bos_id]

    def encode(self, text: str) -> list[int]:
        # Captions are data: special-token text inside them is encoded as plain text, never as control tokens.
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


@dataclass
class SentencePieceTokenizer:
    path: str
    kind: str = "sentencepiece"

    def __post_init__(self) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.vocab_size = self._sp.get_piece_size()
        self.prefix_ids = [self.bos_id] if self.bos_id is not None else []

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def _is_tiktoken_file(path: Path) -> bool:
    """tiktoken files are text lines `<base64 token> <rank>`; sentencepiece models are binary protobufs."""
    with path.open("rb") as fh:
        head = fh.readline(4096)
    try:
        token, rank = head.decode("utf-8").split()
        base64.b64decode(token, validate=True)
        int(rank)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A directory with tokenizer.json (preferred) or tokenizer.model, or a tokenizer.model file itself."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(str(path))
        if (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer not found")
    if path.name == "tokenizer.json":
        return HFTokenizer(str(path.parent))
    if _is_tiktoken_file(path):
        return TiktokenTokenizer(str(path))
    try:
        return SentencePieceTokenizer(str(path))
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{path}: neither a tiktoken BPE file nor a sentencepiece model ({err})") from err


def write_byte_level_tiktoken(path: str | Path) -> Path:
    """A tiktoken BPE file of the 256 single bytes and no merges: a tokenizer for tiny random models that needs no
    download (vocabulary 256 + Llama-3's 256 special tokens = 512)."""
    path = Path(path)
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path
