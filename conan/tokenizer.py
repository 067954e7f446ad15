"""Byte-level BPE tokenizer trained with HF `tokenizers` on a Ray Data text stream.

Byte-level means every string of any script encodes without unknown tokens and decodes back
exactly. The post-processor appends <|eos|> to every encoded text: pretraining packs documents
separated by it, and last-token pooling reads the state there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from conan.config import ConfigError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Markers the SFT and embedding stages put around instruction/input/output, queries and documents.
INSTRUCTION, INPUT, OUTPUT = "<|instruction|>", "<|input|>", "<|output|>"
QUERY, DOCUMENT = "<|query|>", "<|document|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, INSTRUCTION, INPUT, OUTPUT, QUERY, DOCUMENT]  # ids 0..7, pad=0 bos=1 eos=2
# The SFT stage's prompt as a chat template (system → instruction, user → input, then the output marker), so that
# transformers' and vLLM's chat APIs prompt an SFT model the way it was trained. Only the Llama export (the causal LM
# for generation) carries it: sentence-transformers would wrap every text of an embedding model in it.
CHAT_TEMPLATE = ("{%- for m in messages -%}"
                 "{%- if m['role'] == 'system' -%}" + INSTRUCTION + "{{ m['content'] }}"
                 "{%- elif m['role'] == 'user' -%}" + INPUT + "{{ m['content'] }}"
                 "{%- elif m['role'] == 'assistant' -%}" + OUTPUT + "{{ m['content'] }}" + EOS +
                 "{%- endif -%}{%- endfor -%}"
                 "{%- if add_generation_prompt -%}" + OUTPUT + "{%- endif -%}")


def check_vocab_size(vocab_size: int) -> None:
    """ConfigError unless the vocabulary holds the 256 bytes and the special tokens (checked before Ray starts)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ConfigError(f"vocab_size {vocab_size} must leave room for 256 bytes and {len(SPECIAL_TOKENS)} specials")


def train_tokenizer_from_iterator(texts: Iterable[str], vocab_size: int,
                                  min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on an iterator of strings and wrap it as a PreTrainedTokenizerFast."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[3:], padding_side="right",
        clean_up_tokenization_spaces=False)


def _stream_texts(paths: list[str], max_texts: int | None, batch_size: int = 4096) -> Iterator[str]:
    from conan.data.readers import read_text_dataset

    ds = read_text_dataset(paths)
    if max_texts is not None:
        ds = ds.limit(max_texts)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield from (t for t in batch.column("text").to_pylist() if t)


def train_tokenizer(paths: list[str], out_dir: str | Path, vocab_size: int, min_frequency: int = 2,
                    max_texts: int | None = None) -> PreTrainedTokenizerFast:
    """Train on text/parquet/JSONL files streamed through Ray Data and save to `out_dir`."""
    tokenizer = train_tokenizer_from_iterator(_stream_texts(paths, max_texts), vocab_size, min_frequency)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def token_ids(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Each text's token ids with the post-processor's <|eos|>, as `tokenizer(texts)["input_ids"]` gives them. Each
    distinct text is tokenized once (training rows repeat their passages: the demo's supervised rows hold 154k distinct
    texts in 708k; their token shards took 34.5 s, now 9.2 s) and the Rust tokenizer is called directly
    (transformers' per-text conversion cost a quarter of the time). Equal texts share one list: read it, do not change it."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:  # what a `tokenizer(..., truncation=True)` call left set
        backend.no_truncation()
        backend.no_padding()
    unique = list(dict.fromkeys(texts))
    ids = dict(zip(unique, (e.ids for e in backend.encode_batch(unique, add_special_tokens=True))))
    return [ids[t] for t in texts]


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of texts (each ending with <|eos|>), cut at max_length keeping the <|eos|>: what training, the
    evaluation and the server feed the model (the same as `tokenizer(texts, truncation=True, max_length=...)`)."""
    eos = tokenizer.eos_token_id
    return [ids if len(ids) <= max_length else ids[:max_length - 1] + [eos] for ids in token_ids(tokenizer, texts)]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved Conan tokenizer directory (local files only)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected {path / 'tokenizer.json'})")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
