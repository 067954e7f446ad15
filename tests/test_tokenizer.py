"""Byte-level BPE trained through Ray Data on real multilingual text."""

import pytest

from conan.tokenizer import EOS, PAD, SPECIAL_TOKENS, load_tokenizer

# Tatoeba language → script; one sentence file per language in ../shared/data/tatoeba.
SCRIPTS = {"eng": "Latin", "rus": "Cyrillic", "ara": "Arabic", "cmn": "Han", "jpn": "Kana/Han",
           "kor": "Hangul", "hin": "Devanagari", "tha": "Thai", "ell": "Greek", "heb": "Hebrew",
           "kat": "Georgian", "hye": "Armenian", "tam": "Tamil", "ben": "Bengali", "amh": "Ethiopic"}


def _sentences(data_root, lang, n=50):
    side = "deu" if lang == "eng" else lang
    path = data_root / "tatoeba" / f"tatoeba.{side}-eng.{lang}"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) >= n, path
    return lines[-n:]


def test_round_trips_every_script_without_unknown_tokens(tokenizer, data_root):
    assert len(SCRIPTS) >= 10
    vocab = len(tokenizer)
    for lang in SCRIPTS:
        for text in _sentences(data_root, lang):
            ids = tokenizer(text)["input_ids"]
            assert ids[-1] == tokenizer.eos_token_id
            assert all(0 <= i < vocab for i in ids)
            assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == text, (lang, text)


def test_learned_merges_compress_real_text(tokenizer, data_root):
    """A trained BPE needs far fewer tokens than bytes; merges were learned for each script seen."""
    # Tokens per byte (1.0 untrained); measured with this 4k vocab over ~115 languages: eng .42, rus .30,
    # ara .33, cmn .55 (Han needs about one token a 3-byte character).
    for lang, ratio in (("eng", 0.5), ("rus", 0.4), ("ara", 0.45), ("cmn", 0.65)):
        text = " ".join(_sentences(data_root, lang, 200))
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert tokens < ratio * len(text.encode("utf-8")), (lang, tokens, len(text.encode("utf-8")))


def test_special_tokens_and_padding(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.eos_token) == (PAD, EOS)
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    batch = tokenizer(["a much longer sentence here", "short"], padding=True)
    assert batch["attention_mask"][1][-1] == 0 and batch["input_ids"][1][-1] == 0  # right padding
    assert len(tokenizer) == 4096


def test_saved_directory_reloads_identically(tokenizer, tokenizer_dir, tmp_path):
    text = "Конан встречает 世界 and the world"
    assert load_tokenizer(tokenizer_dir)(text)["input_ids"] == tokenizer(text)["input_ids"]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_rejects_a_vocabulary_too_small_for_the_byte_alphabet():
    from conan.tokenizer import train_tokenizer_from_iterator
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer_from_iterator(["abc"], vocab_size=100)
