"""One tokenization for training shards, the evaluation and the server (conan.tokenizer.token_ids / encode_texts):
the ids transformers' tokenizer call gives, each distinct text tokenized once."""

from __future__ import annotations


def test_token_ids_and_truncation_match_the_transformers_call(small_tokenizer, data_root):
    from conan.data.public_sets import tatoeba_lines
    from conan.tokenizer import encode_texts, token_ids

    lines = tatoeba_lines(data_root / "tatoeba" / "tatoeba.deu-eng.deu", "test")[:300]
    # Short sentences, paragraph-long texts and repeats of both (a retrieval set's passages recur row after row).
    texts = [*lines, *(" ".join(lines[i:i + 20]) for i in range(0, 300, 20)), *lines[:50], "", lines[0]]
    expected = small_tokenizer(texts)["input_ids"]
    assert token_ids(small_tokenizer, texts) == expected
    cut = encode_texts(small_tokenizer, texts, 16)
    assert cut == small_tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    assert max(map(len, cut)) == 16 and all(ids[-1] == small_tokenizer.eos_token_id for ids in cut)
    # That truncating call leaves the Rust tokenizer set to cut at 16; token_ids still gives whole texts.
    assert small_tokenizer.backend_tokenizer.truncation is not None
    assert token_ids(small_tokenizer, texts) == expected
    assert token_ids(small_tokenizer, []) == []
