"""The tokenizer of a base model, behind one interface used by training, evaluation, `generate` and lm-eval.

- HF `tokenizer.json` (SmolLM2, most converted checkpoints), or the tokenizer inside a `.gguf` file:
  transformers' AutoTokenizer (the only backend with a chat template).
- tiktoken-format `tokenizer.model` (Llama-3's original release): tiktoken with Llama-3's split pattern.
- sentencepiece `tokenizer.model` (Llama-2): sentencepiece.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
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
    # The ids this tokenizer ends a text with ([] when it has no EOS); a model's config may name more stop ids.
    eos_ids: list[int]
    vocab_size: int
    # What the tokenizer itself puts before a text (BOS for Llama-2/3, nothing for SmolLM2): documents in training
    # start with it, so prompts encoded the same way at inference see the same context.
    prefix_ids: list[int]
    # A Jinja chat template (HF tokenizers that ship one), else None.
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """Plain ids of `text`, without the prefix."""
        ...

    def encode_chat(self, text: str) -> list[int]:
        """`text` as one user turn through the chat template, ready for the assistant's answer (ValueError
        without a template)."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


def as_ids(value: int | Iterable[int] | None) -> list[int]:
    """An id, a list of ids (Llama 3's eos_token_id) or None, as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _no_chat_template(kind: str) -> ValueError:
    return ValueError(f"the {kind} tokenizer has no chat template; run without chat formatting")


@dataclass
class HFTokenizer:
    path: str
    # A .gguf file inside `path` whose embedded tokenizer is read (transformers converts it).
    gguf_file: str | None = None
    kind: str = "hf"

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        self._tok = AutoTokenizer.from_pretrained(self.path, **extra)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        self.eos_ids = as_ids(self.eos_id)
        self.vocab_size = len(self._tok)
        self.prefix_ids = list(self._tok("", add_special_tokens=True)["input_ids"])

    # A property over the transformers tokenizer, so a template set later (as transformers allows) is used.
    @property
    def chat_template(self) -> str | None:
        return getattr(self._tok, "chat_template", None)

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._tok.chat_template = template

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, text: str) -> list[int]:
        if self.chat_template is None:
            raise _no_chat_template(self.kind)
        rendered = self._tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        # The template already wrote any BOS it wants; the tokenizer must not add another.
        return list(self._tok(rendered, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


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
        self._num_ordinary = n
        self.bos_id = special["<|begin_of_text|>"]
        self.eos_id = special["<|end_of_text|>"]
        self.eos_ids = [self.eos_id]
        self.vocab_size = n + len(special)
        self.prefix_ids = [self.bos_id]
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        # Captions are data: special-token text inside them is encoded as plain text, never as control tokens.
        return self._enc.encode(text, disallowed_special=())

    def encode_chat(self, text: str) -> list[int]:
        raise _no_chat_template(self.kind)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i < self._num_ordinary]
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
        self.eos_ids = as_ids(self.eos_id)
        self.vocab_size = self._sp.get_piece_size()
        self.prefix_ids = [self.bos_id] if self.bos_id is not None else []
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_chat(self, text: str) -> list[int]:
        raise _no_chat_template(self.kind)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
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
    """A directory with tokenizer.json (preferred) or tokenizer.model, a tokenizer.model / tokenizer.json file
    itself, or a .gguf file (its embedded tokenizer, read from the file's directory by transformers)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return HFTokenizer(str(path.parent), gguf_file=path.name)
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
