"""Tokenizers for served models: build, train, save and load them, and render chat prompts.

A `TokenizerBundle` is a `tokenizers.Tokenizer` plus what serving needs besides the vocabulary:
the BOS/EOS/pad ids, whether a prompt starts with BOS, and the chat template. It comes from one of
three places:

    bundle = tokenizer_from_gguf_fields(read_gguf_metadata(gguf.GGUFReader(path)))
    bundle = TokenizerBundle.from_hf_dir("path/to/hf_checkpoint")
    bundle = train_bpe(texts, vocab_size=4096)              # for small test models

and is written next to a checkpoint with `bundle.save(directory)` and read back with
`TokenizerBundle.load(directory)`. The directory holds a `tokenizer.json` and a
`tokenizer_config.json` in the layout Hugging Face uses, so `transformers` can read it too.

GGUF files store a byte-level BPE vocabulary as lists (tokens, merges, token types) and name the
way text is split before BPE (`tokenizer.ggml.pre`). We rebuild the split llama.cpp applies for
that name: for SmolLM (`smollm`) every digit is split off on its own first, then the GPT-2 regex
runs -- the same as the `Digits(individual_digits=True)` + `ByteLevel` pre-tokenizer of the
original `tokenizer.json`. (transformers' GGUF loader ignores `smollm` and applies only the GPT-2
regex, which differs for whitespace runs followed by a digit, e.g. "  4" or "\\n 5".)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
)

__all__ = [
    "CHATML_TEMPLATE",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "TokenizerBundle",
    "byte_level_pre_tokenizer",
    "load_gguf_tokenizer",
    "read_gguf_metadata",
    "tokenizer_from_gguf_fields",
    "train_bpe",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# ChatML, the template `train_bpe` attaches when `<|im_start|>`/`<|im_end|>` are special tokens.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerBundle:
    """A tokenizer and the special-token facts that serving needs alongside it."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    special_tokens: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the first of `eos_token_ids`), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token(self, token_id: int | None) -> str | None:
        """The string of one id, or None for None."""
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended only if `add_special_tokens` and `add_bos_token`.

        Special tokens written in the text (e.g. "<|im_start|>") always map to their own id.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters become U+FFFD."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **template_vars: Any,
    ) -> str:
        """Render `messages` with the chat template, the way transformers does.

        The template runs in a sandboxed, immutable jinja2 environment; it sees `messages`,
        `add_generation_prompt`, `tools`, `documents`, the special-token strings (`bos_token`,
        `eos_token`, `pad_token`, `unk_token`) and any `template_vars`. A template calling
        `raise_exception(msg)` raises `jinja2.TemplateError(msg)`.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        context: dict[str, Any] = {
            "bos_token": self.token(self.bos_token_id),
            "eos_token": self.token(self.eos_token_id),
            "pad_token": self.token(self.pad_token_id),
            "unk_token": self.token(self.unk_token_id),
            **template_vars,
        }
        return _compile_chat_template(self.chat_template).render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`, each atomically."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _write_atomic(path / TOKENIZER_FILE, self.tokenizer.to_str(pretty=False))
        config = json.dumps(self._config_dict(), indent=2, ensure_ascii=False) + "\n"
        _write_atomic(path / TOKENIZER_CONFIG_FILE, config)

    def _config_dict(self) -> dict[str, Any]:
        """The tokenizer_config.json contents: HF's keys, plus the exact ids under our own."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token(self.bos_token_id),
            "eos_token": self.token(self.eos_token_id),
            "pad_token": self.token(self.pad_token_id),
            "unk_token": self.token(self.unk_token_id),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "unk_token_id": self.unk_token_id,
            "special_tokens": list(self.special_tokens),
        }

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TokenizerBundle:
        """Read a directory written by `save`.

        Raises FileNotFoundError for a missing file and ValueError for one that cannot be parsed;
        both name the file.
        """
        path = Path(directory)
        tokenizer = _read_tokenizer(path / TOKENIZER_FILE)
        config_path = path / TOKENIZER_CONFIG_FILE
        config = _read_json(config_path)
        try:
            return cls(
                tokenizer=tokenizer,
                bos_token_id=_optional_int(config["bos_token_id"]),
                eos_token_ids=tuple(int(i) for i in config["eos_token_ids"]),
                pad_token_id=_optional_int(config["pad_token_id"]),
                unk_token_id=_optional_int(config.get("unk_token_id")),
                add_bos_token=bool(config["add_bos_token"]),
                chat_template=config.get("chat_template"),
                special_tokens=tuple(config.get("special_tokens", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{config_path}: missing or invalid entry: {err!r}") from err

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike[str]) -> TokenizerBundle:
        """Read a Hugging Face tokenizer: `tokenizer.json` plus `tokenizer_config.json`.

        EOS ids are the tokenizer config's `eos_token` followed by the `eos_token_id`(s) of
        `generation_config.json` (or else `config.json`). The chat template comes from
        `chat_template.jinja` if present, else from the tokenizer config.
        """
        path = Path(directory)
        tokenizer = _read_tokenizer(path / TOKENIZER_FILE)
        config_path = path / TOKENIZER_CONFIG_FILE
        config = _read_json(config_path) if config_path.exists() else {}
        model_config = _read_model_config(path)
        bos = _token_id(tokenizer, config.get("bos_token"))
        if bos is None:
            bos = _optional_int(model_config.get("bos_token_id"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(tokenizer, bos)
        return cls(
            tokenizer=tokenizer,
            bos_token_id=bos,
            eos_token_ids=_hf_eos_ids(tokenizer, config, model_config),
            pad_token_id=_token_id(tokenizer, config.get("pad_token")),
            unk_token_id=_token_id(tokenizer, config.get("unk_token")),
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(path, config),
            special_tokens=_special_token_strings(tokenizer),
        )


# --- chat templates ------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """jinja's own `tojson` escapes HTML characters; chat templates expect plain JSON."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, immutable)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


# --- files ---------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; use the usual file mode
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text: {err}") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tokenizer(path: Path) -> Tokenizer:
    text = _read_text(path)
    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for bad input
        raise ValueError(f"{path}: not a valid tokenizers file: {err}") from err


# --- Hugging Face directories --------------------------------------------------------------


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(tokenizer: Tokenizer, value: Any) -> int | None:
    content = _token_content(value)
    return None if content is None else tokenizer.token_to_id(content)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _read_model_config(directory: Path) -> dict[str, Any]:
    """config.json overlaid with generation_config.json (only their token ids are used)."""
    merged: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        if (directory / name).exists():
            merged.update(_read_json(directory / name))
    return merged


def _hf_eos_ids(
    tokenizer: Tokenizer, config: Mapping[str, Any], model_config: Mapping[str, Any]
) -> tuple[int, ...]:
    ids: list[int] = []
    first = _token_id(tokenizer, config.get("eos_token"))
    for token_id in ([first] if first is not None else []) + _as_id_list(
        model_config.get("eos_token_id")
    ):
        if token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def _hf_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_path = directory / CHAT_TEMPLATE_FILE
    if jinja_path.exists():
        return _read_text(jinja_path)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def _post_processor_adds(tokenizer: Tokenizer, bos_token_id: int | None) -> bool:
    """Whether the tokenizer's own post-processor starts every sequence with BOS."""
    if bos_token_id is None:
        return False
    ids = tokenizer.encode("", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_token_id


def _special_token_strings(tokenizer: Tokenizer) -> tuple[str, ...]:
    added = tokenizer.get_added_tokens_decoder()
    return tuple(added[i].content for i in sorted(added) if added[i].special)


# --- GGUF ----------------------------------------------------------------------------------


def read_gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All metadata of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


# The GPT-2 split regex preceded by splitting off every digit (llama.cpp's "\p{N}" expression).
_DIGIT_SPLIT_PRES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
# The plain GPT-2 split regex (what `ByteLevel(use_regex=True)` applies).
_GPT2_PRES = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})

_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_PRES = {
    "llama3": _LLAMA3_PATTERN,
    "llama-bpe": _LLAMA3_PATTERN,
    "llama-v3": _LLAMA3_PATTERN,
    "falcon3": _LLAMA3_PATTERN,
    "qwen2": _QWEN2_PATTERN,
    "deepseek-r1-qwen": _QWEN2_PATTERN,
}


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp applies to a byte-level BPE vocabulary for `tokenizer.ggml.pre`.

    A missing name means GPT-2's split, as in llama.cpp. Unknown names raise ValueError rather
    than silently splitting text differently from how the merges were learned.
    """
    if pre is None or pre in _GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _REGEX_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_PRES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    supported = sorted(_GPT2_PRES | _DIGIT_SPLIT_PRES | set(_REGEX_PRES))
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {supported}")


def _gguf_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges: malformed merge {merge!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _gguf_token_id(fields: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = fields.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not 0 <= int(value) < n_tokens:
        raise ValueError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary of {n_tokens}")
    return int(value)


def _gguf_added_tokens(tokens: Sequence[str], token_types: Sequence[int]) -> list[AddedToken]:
    """Control tokens as special tokens, user-defined ones as plain added tokens.

    Either way they are matched whole in the input and never split by BPE; only the control
    ones are dropped by `decode(..., skip_special_tokens=True)`, as in llama.cpp.
    """
    if not token_types:
        return []
    added = []
    for token, token_type in zip(tokens, token_types, strict=True):
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            special = token_type == _TOKEN_TYPE_CONTROL
            added.append(AddedToken(token, special=special, normalized=False))
    return added


def _gguf_eos_ids(fields: Mapping[str, Any], n_tokens: int) -> tuple[int, ...]:
    """EOS, then the end-of-turn / end-of-message ids llama.cpp also stops on."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = _gguf_token_id(fields, key, n_tokens)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def tokenizer_from_gguf_fields(fields: Mapping[str, Any]) -> TokenizerBundle:
    """Build the tokenizer described by GGUF metadata (as returned by `read_gguf_metadata`).

    Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported; any other model raises
    ValueError naming it.
    """
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r}; supported: ['gpt2']")
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    token_types = list(fields.get("tokenizer.ggml.token_type") or [])
    if token_types and len(token_types) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _gguf_merges(fields.get("tokenizer.ggml.merges") or [])
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    added = _gguf_added_tokens(tokens, token_types)
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    n = len(tokens)
    return TokenizerBundle(
        tokenizer=tokenizer,
        bos_token_id=_gguf_token_id(fields, "bos_token_id", n),
        eos_token_ids=_gguf_eos_ids(fields, n),
        pad_token_id=_gguf_token_id(fields, "padding_token_id", n),
        unk_token_id=_gguf_token_id(fields, "unknown_token_id", n),
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
        special_tokens=tuple(t.content for t in added if t.special),
    )


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> TokenizerBundle:
    """Read the tokenizer of a GGUF file."""
    return tokenizer_from_gguf_fields(read_gguf_metadata(gguf.GGUFReader(path)))


# --- training ------------------------------------------------------------------------------


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
) -> TokenizerBundle:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for the same input).

    All 256 bytes are in the initial alphabet, so any text round-trips through encode/decode.
    Special tokens take the first ids; EOS (and pad) is `<|endoftext|>` if given, else the first
    special token. With `<|im_start|>` and `<|im_end|>` the bundle gets a ChatML template.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(alphabet)} bytes plus "
            f"{len(special_tokens)} special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos_token = "<|endoftext|>" if "<|endoftext|>" in special_tokens else None
    if eos_token is None and special_tokens:
        eos_token = special_tokens[0]
    eos_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
    chatml = {"<|im_start|>", "<|im_end|>"} <= set(special_tokens)
    return TokenizerBundle(
        tokenizer=tokenizer,
        bos_token_id=None,
        eos_token_ids=() if eos_id is None else (eos_id,),
        pad_token_id=eos_id,
        add_bos_token=False,
        chat_template=CHATML_TEMPLATE if chatml else None,
        special_tokens=tuple(special_tokens),
    )
