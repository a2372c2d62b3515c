"""The dataset check: a local mlx-lm data folder, validated before any training.

Runs on the laptop at ``herd submit`` and in ``herd train`` before the model loads, so it never
imports MLX (``transformers`` is imported lazily, only to load a tokenizer). It follows mlx-lm
0.32's loader (``mlx_lm/tuner/datasets.py``) exactly:

- a folder holding ``train.jsonl``, ``valid.jsonl`` and optionally ``test.jsonl``; mlx-lm parses
  every file present, so a broken ``test.jsonl`` breaks training too;
- one JSON object per line: ``{"text"}``, ``{"prompt", "completion"}`` or
  ``{"messages"[, "tools"]}``,
  with the key names overridable by ``text_feature``, ``prompt_feature``, ``completion_feature``
  and ``chat_feature``; a file's format is its first record's (completions before chat before
  text), and keys the format does not use are ignored;
- tokens are counted as the dataset classes count them: ``encode`` plus EOS for text, the chat
  template for chat and completions (a completion is a user/assistant exchange).

Every problem in every file is collected in one pass per file and raised as one
:class:`~herd.errors.DatasetError` naming the file, the first line numbers and how many lines are
affected. Only what mlx-lm would fail on is an error; the rest is a warning with file:line:
sequences longer than ``max_seq_length`` (mlx-lm truncates them), and chat roles or value types
outside the usual ones. Whether a conversation is valid is the tokenizer's chat template's call,
as in mlx-lm (a record the template rejects is an error; one it renders is trained on): without
the model's tokenizer (a hub id on a laptop) what may fail is a warning.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd import log
from herd.errors import DatasetError

logger = log.get(__name__)

SPLITS = ("train", "valid", "test")
# Roles the chat templates of mainstream models use (OpenAI adds "developer"; Llama 3.1 uses
# "ipython" for tool output). Another role is a warning, not an error: the model's chat template
# decides (mlx-lm trains on what it renders), but a typo ("asistant") is silently dropped or
# mis-rendered by many templates.
USUAL_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function", "ipython"})
# How many line numbers an error message lists before it says "and N more".
SHOWN_LINES = 5
# Records tokenized per call: the fast tokenizer batches in Rust, and memory stays bounded.
TOKENIZE_CHUNK = 512
TOKENIZE_BYTES = 4 * 1024 * 1024  # ...and at most this much text per call
# The longest record (line) read: far beyond any model's context (~4M tokens), far below what
# reading a hostile file at once would cost. (It was 1 MiB: a 1.2 MB document, which mlx-lm
# trains on truncated, was refused: an outside run.)
MAX_RECORD_BYTES = 16 * 1024 * 1024
FORMATS_HELP = (
    'mlx-lm reads one JSON object per line: {"text": ...}, {"prompt": ..., "completion": ...} or '
    '{"messages": [{"role": ..., "content": ...}, ...]} (optionally with "tools"); '
    "see mlx_lm/LORA.md#Data"
)


@dataclass(frozen=True)
class SplitReport:
    name: str  # train | valid | test
    path: Path
    records: int
    format: str  # text | completions | chat | tools
    too_long: int  # records longer than max_seq_length (0 without a tokenizer)
    longest: int | None  # in tokens, when a tokenizer was given


@dataclass(frozen=True)
class DatasetReport:
    splits: dict[str, SplitReport]
    warnings: list[str]
    sha256: dict[str, str]  # file name -> hex digest of its bytes


@dataclass(frozen=True)
class Features:
    """The record keys mlx-lm looks for (its YAML's ``*_feature`` options)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    chat: str = "messages"

    def format_of(self, record: dict) -> str | None:
        # mlx-lm's create_dataset order: completions, then chat, then text.
        if self.prompt in record and self.completion in record:
            return "completions"
        if self.chat in record:
            return "chat"
        if self.text in record:
            return "text"
        return None

    def known(self) -> str:
        return f"{self.text!r} | {self.prompt!r}+{self.completion!r} | {self.chat!r}[+'tools']"


@dataclass
class _Issue:
    """One kind of problem in one file: the lines it hits and the first example."""

    what: str  # e.g. "malformed JSON line{s}": the noun's {s} is "s" unless there is exactly one
    fix: str
    lines: list[int] = field(default_factory=list)
    example: str = ""

    def describe(self, name: str, unit: str = "line") -> str:
        n = len(self.lines)
        shown = ", ".join(map(str, self.lines[:SHOWN_LINES]))
        more = f" and {n - SHOWN_LINES} more" if n > SHOWN_LINES else ""
        where = f"{unit} {shown}" if n == 1 else f"{unit}s {shown}{more}"
        example = f"; {unit} {self.lines[0]}: {self.example}" if self.example else ""
        # Only the first marker, which follows the noun: feature names from the job config come
        # later in the text and may hold anything, braces included.
        what = self.what.replace("{s}", "" if n == 1 else "s", 1)
        what = what.replace("{is_}", "is" if n == 1 else "are", 1)
        return f"{name}: {n} {what} ({where}){example}. Fix: {self.fix}"


class FileCheck:
    """Collects the issues of one file, grouped by kind so a message stays short: errors (what
    mlx-lm would fail on) and warnings (what it trains on, but probably not as meant)."""

    def __init__(self, name: str, unit: str = "line"):
        self.name, self.unit = name, unit  # unit: "line" of a file, "row" of a HF dataset
        self.issues: dict[str, _Issue] = {}
        self.warned: dict[str, _Issue] = {}
        self.whole_file: list[str] = []  # problems with no line (empty file, too few records)

    def add(self, key: str, line: int, what: str, fix: str, example: str = "") -> None:
        issue = self.issues.setdefault(key, _Issue(what, fix, example=example))
        issue.lines.append(line)

    def warn(self, key: str, line: int, what: str, fix: str, example: str = "") -> None:
        issue = self.warned.setdefault(key, _Issue(what, fix, example=example))
        issue.lines.append(line)

    def messages(self) -> list[str]:
        return self.whole_file + [i.describe(self.name, self.unit) for i in self.issues.values()]

    def warnings(self) -> list[str]:
        return [i.describe(self.name, self.unit) for i in self.warned.values()]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_record(rec: dict, fmt: str, feats: Features, line: int, fc: FileCheck,
                  mask_prompt: bool, templated: bool) -> bool:
    """Checks of one record in its file's format; False when mlx-lm would fail on it (then it
    is not tokenized). ``templated``: a tokenizer will render the record through the chat
    template, which then decides what the template accepts; without one, doubts are warnings."""
    if fmt == "text":
        value = rec[feats.text]
        if not isinstance(value, str):  # TextDataset.process encodes it: a tokenizer error
            fc.add("text_type", line, f"record{{s}} whose {feats.text!r} is not a string",
                   f"make {feats.text!r} a string", _short(value))
            return False
        if not value and not templated:
            # TextDataset.process appends EOS after the last token: an empty text has none
            # unless the tokenizer adds a BOS (known once it is loaded: then it is counted).
            fc.warn("text_empty", line, f"record{{s}} with an empty {feats.text!r}",
                    "remove them or give them text (mlx-lm fails on them unless the tokenizer "
                    "adds a BOS token)")
        return True
    if fmt == "completions":
        for key in (feats.prompt, feats.completion):
            if not isinstance(rec[key], str):  # the template renders it as the content
                fc.warn(f"{key}_type", line, f"record{{s}} whose {key!r} is not a string",
                        f"make {key!r} a string: the chat template renders "
                        f"{type(rec[key]).__name__} content as it sees fit", _short(rec[key]))
        return True
    messages = rec[feats.chat]
    if not isinstance(messages, list) or not messages:
        if mask_prompt or not templated:
            # with mask_prompt, mlx-lm reads messages[-1]["role"]
            fc.add("chat_type", line, f"record{{s}} whose {feats.chat!r} is not a non-empty list",
                   f"make {feats.chat!r} a list of {{\"role\", \"content\"}} objects",
                   _short(messages))
            return False
        return True
    if mask_prompt and not isinstance(messages[-1], dict):
        fc.add("chat_last", line, "record{s} whose last message is not an object",
               "with mask_prompt every message must be a {\"role\", \"content\"} object",
               _short(messages[-1]))
        return False
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in USUAL_ROLES:
            shown = f"role {_short(role)}" if isinstance(msg, dict) else \
                f"is {_short(msg)}, not an object"
            fc.warn("role", line, "record{s} with a message whose role is missing or unusual",
                    f"check the role against the model's chat template; the usual ones are "
                    f"{sorted(USUAL_ROLES)} (ShareGPT's 'human'/'gpt' are 'user'/'assistant')",
                    f"message {i} {shown}")
            break
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        fc.warn("tools_type", line, "record{s} whose 'tools' is not a list",
                "make 'tools' a list of tool definitions (the chat template receives it as is)",
                _short(tools))
    return True


_LONE_CR = re.compile(rb"\r(?!\n)")


def numbered_lines(path: Path, digest: Any) -> Iterator[tuple[int, bytes]]:
    """Numbered lines (1-based) of a file, each with its end, hashing its bytes on the way
    through. Lines end as Python's text mode ends them (mlx-lm reads ``for l in open(path)``):
    at \n, \r\n or a lone \r (an old Mac's line ends: a file of them read as one malformed
    line, an outside run). A line longer than MAX_RECORD_BYTES is refused as soon as it is
    seen, so memory stays bounded whatever the file holds (a tokenizer given one 50 MB record
    needs gigabytes). Linear in the file: readline's own \n scan, then lone \r's within what
    it read, the unended tail carried to the next read."""
    number, carry = 0, b""
    with path.open("rb") as f:
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            digest.update(raw)
            data, start = carry + raw if carry else raw, 0
            ended = data.endswith(b"\n")
            for m in _LONE_CR.finditer(data):
                if m.end() == len(data) and not ended:
                    break  # (a \r last in what was read may be the first half of a \r\n)
                number += 1
                yield number, _bounded(path, number, data[start:m.end()])
                start = m.end()
            carry = _bounded(path, number + 1, data[start:])
            if ended:
                number += 1
                yield number, carry
                carry = b""
        if carry:
            yield number + 1, carry


def _bounded(path: Path, number: int, line: bytes) -> bytes:
    if len(line) > MAX_RECORD_BYTES:
        raise DatasetError(
            f"{path.name}:{number}: a record longer than {MAX_RECORD_BYTES // 1024**2} MiB",
            hint="split it into shorter records: mlx-lm cuts every record to "
            "max_seq_length tokens anyway (16 MiB is ~4M tokens)")
    return line


def _enable_thinking(tokenizer: Any) -> bool:
    # mlx-lm's TokenizerWrapper passes enable_thinking = "the vocab has think tokens" to every
    # chat template; a plain transformers tokenizer must be told the same to count alike.
    if hasattr(tokenizer, "has_thinking"):
        return bool(tokenizer.has_thinking)
    vocab = tokenizer.get_vocab()
    pairs = [("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"),
             ("<|think:start|>", "<|think:end|>"), ("<|channel>", "<channel|>")]
    return any(a in vocab and b in vocab for a, b in pairs)


class _Lengths:
    """Token counts of one file, tokenized in chunks exactly as mlx-lm's dataset classes do."""

    def __init__(self, tokenizer: Any, fmt: str, feats: Features, fc: FileCheck,
                 mask_prompt: bool = False):
        self.tok, self.fmt, self.feats, self.fc = tokenizer, fmt, feats, fc
        self.mask_prompt = mask_prompt and fmt != "text"  # (mlx-lm masks no text record)
        self.pending: list[tuple[int, dict]] = []
        self.pending_bytes = 0
        self.lengths: list[tuple[int, int, int]] = []  # (line, tokens, masked prompt tokens)
        self.thinking = _enable_thinking(tokenizer) if fmt != "text" else False

    def add(self, line: int, rec: dict, size: int = 0) -> None:
        self.pending.append((line, rec))
        self.pending_bytes += size
        if len(self.pending) >= TOKENIZE_CHUNK or self.pending_bytes >= TOKENIZE_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.fmt == "text":
            texts = [rec[self.feats.text] for _, rec in self.pending]
            eos = self.tok.eos_token_id
            # A transformers tokenizer encodes a list at once (in Rust); mlx-lm's TokenizerWrapper
            # is not callable, so it encodes one by one. Both equal tokenizer.encode(text).
            if callable(self.tok):
                encoded = self.tok(texts)["input_ids"]
            else:
                encoded = [self.tok.encode(t) for t in texts]
            for (line, _), ids in zip(self.pending, encoded):
                if not ids:  # TextDataset.process reads the last token: an IndexError
                    self.fc.add("text_empty", line,
                                f"record{{s}} with an empty {self.feats.text!r}",
                                "remove them or give them text (this tokenizer encodes an "
                                "empty text to no tokens, on which mlx-lm fails)")
                    continue
                # TextDataset.process: encode, then append EOS unless it is already last.
                self.lengths.append((line, len(ids) + (ids[-1] != eos), 0))
        else:
            for line, rec in self.pending:
                self._chat_length(line, rec)
        self.pending, self.pending_bytes = [], 0

    def _chat_length(self, line: int, rec: dict) -> None:
        if self.fmt == "completions":
            messages = [{"role": "user", "content": rec[self.feats.prompt]},
                        {"role": "assistant", "content": rec[self.feats.completion]}]
        else:
            messages = rec[self.feats.chat]
        try:
            ids = self.tok.apply_chat_template(
                messages, tools=rec.get("tools"), tokenize=True, return_dict=False,
                enable_thinking=self.thinking,
            )
        except Exception as e:  # noqa: BLE001 - a template error is the record's problem; reported
            if not getattr(self.tok, "chat_template", None):  # the model's, not the record's
                self.fc.add("no_template", line, "record{s} that need a chat template, which "
                            "the model's tokenizer does not have",
                            "use text data (or a model whose tokenizer has a chat_template), "
                            "as mlx-lm fails on it too", "")
            else:
                self.fc.add("template", line, "record{s} the chat template rejects",
                            "make the conversation fit the model's chat template (roles, order)",
                            f"{type(e).__name__}: {e}")
            return
        offset = 0
        if self.mask_prompt:  # mlx-lm's process(): the prompt's tokens are not trained on
            try:
                offset = len(self.tok.apply_chat_template(
                    messages[:-1], tools=rec.get("tools"), tokenize=True, return_dict=False,
                    add_generation_prompt=messages[-1].get("role") == "assistant",
                    enable_thinking=self.thinking))
            except Exception as e:  # noqa: BLE001 - as mlx-lm's own call fails, mid-training
                # (a conversation of one assistant message: "Cannot apply chat template to an
                # empty conversation" killed the run with no file or line; the check had said
                # ok: an outside run)
                self.fc.add("prompt_template", line, "record{s} whose prompt (every message but "
                            "the last) the chat template cannot render, as mask_prompt needs",
                            "give each conversation its prompt before the last message (a user "
                            "turn), or drop mask_prompt", f"{type(e).__name__}: {e}")
                return
        self.lengths.append((line, len(ids), offset))


@dataclass(frozen=True)
class _FileResult:
    check: FileCheck
    format: str  # "" when no record was readable
    records: int
    lengths: list[tuple[int, int, int]]  # (line, tokens, prompt), empty without a tokenizer
    sha256: str


def _jsonl_records(path: Path, digest: Any, fc: FileCheck) -> Iterator[tuple[int, dict]]:
    """The file's JSON objects with their line numbers; malformed lines go to ``fc``."""
    for line, raw in numbered_lines(path, digest):
        try:
            rec = json.loads(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
            fc.add("json", line, "malformed JSON line{s}", "write UTF-8 JSON, one object per line",
                   f"not UTF-8 ({e.reason} at byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            # (json's "Unterminated string starting at" already ends with its preposition)
            at = " column" if e.msg.endswith(" at") else " at column"
            example = "blank line" if not raw.strip() else f"{e.msg}{at} {e.colno}"
            fc.add("json", line, "malformed JSON line{s}",
                   "each line must be one complete JSON object (no blank lines, no objects "
                   "split across lines)", example)
            continue
        if not isinstance(rec, dict):
            fc.add("object", line, "line{s} that {is_} not a JSON object",
                   'each line must be one JSON object, e.g. {"text": ...}', _short(rec))
            continue
        yield line, rec


def _text_size(obj: Any) -> int:
    """About how much text a record holds (its strings' lengths): what a tokenizer call costs."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_text_size(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_text_size(v) for v in obj)
    return 0


def check_records(fc: FileCheck, numbered: Iterator[tuple[int, dict]], feats: Features,
                  tokenizer: Any, mask_prompt: bool) -> tuple[str, int, list[tuple[int, int]]]:
    """Classify, type-check and tokenize one split's records (``(line, record)``, from a JSONL
    file or a Hugging Face dataset); problems go to ``fc``. Returns (format, records, lengths)."""
    fmt: str | None = None
    first_line = 0
    records = 0
    has_tools = False
    lengths: _Lengths | None = None
    for line, rec in numbered:
        records += 1
        rec_fmt = feats.format_of(rec)
        if rec_fmt is None:
            fc.add("keys", line, "record{s} with none of the known keys",
                   f"give every record one of the known keys: {feats.known()}, or name your "
                   "keys in the job config (prompt_feature, completion_feature, text_feature, "
                   "chat_feature)",
                   f"its keys are {sorted(rec)[:8]}")
            continue
        if fmt is None:
            fmt, first_line = rec_fmt, line
            if tokenizer is not None:
                lengths = _Lengths(tokenizer, fmt, feats, fc, mask_prompt)
        elif rec_fmt != fmt and _format_keys_missing(rec, fmt, feats):
            fc.add(f"mixed_{rec_fmt}", line, f"{rec_fmt} record{{s}} in a {fmt} file",
                   f"mlx-lm reads a whole file in the format of its first record ({fmt}, {fc.unit} "
                   f"{first_line}); convert these records or move them to another dataset",
                   f"keys {sorted(rec)[:8]}")
            continue
        if not _check_record(rec, fmt, feats, line, fc, mask_prompt, tokenizer is not None):
            continue
        has_tools = has_tools or "tools" in rec
        if lengths is not None:
            lengths.add(line, rec, _text_size(rec))
    if lengths is not None:
        lengths.flush()
    if records == 0 and not fc.issues:
        fc.whole_file.append(
            f"{fc.name}: the file is empty (0 records). Fix: add records or delete the file "
            "(mlx-lm fails on an empty split file)"
        )
    if mask_prompt and fmt == "text":
        fc.whole_file.append(
            f"{fc.name}: mask_prompt is set but the data is text ({fc.unit} {first_line}). "
            f"Fix: use {feats.prompt!r}/{feats.completion!r} or {feats.chat!r} records, or set "
            "mask_prompt: false (mlx-lm masks prompts only for completions and chat)"
        )
    shown_fmt = "tools" if fmt == "chat" and has_tools else (fmt or "")
    return shown_fmt, records, lengths.lengths if lengths else []


def _check_file(path: Path, feats: Features, tokenizer: Any, mask_prompt: bool) -> _FileResult:
    """One pass over one file: parse, classify, type-check, tokenize, hash."""
    fc = FileCheck(path.name)
    digest = hashlib.sha256()
    fmt, records, lengths = check_records(fc, _jsonl_records(path, digest, fc), feats, tokenizer,
                                          mask_prompt)
    return _FileResult(fc, fmt, records, lengths, digest.hexdigest())


def _format_keys_missing(rec: dict, fmt: str, feats: Features) -> bool:
    """True when mlx-lm, reading ``rec`` in the file's format, would miss a key it needs."""
    needed = {"text": (feats.text,), "chat": (feats.chat,),
              "completions": (feats.prompt, feats.completion)}[fmt]
    return any(k not in rec for k in needed)


def target_count(tokens: int, offset: int, max_seq_length: int) -> int:
    """How many target positions mlx-lm's loss mask counts for one example of ``tokens`` tokens
    whose first ``offset`` are its prompt (0: none masked).

    The mask is ``offset <= s <= length`` over target positions ``s = 1 .. width - 1``; the batch
    width exceeds every truncated length except when it is capped at ``max_seq_length``, so the
    count depends on the example alone, never on the rest of its batch."""
    length = min(tokens, max_seq_length)
    return max(0, min(length, max_seq_length - 1) - max(offset, 1) + 1)


def _lines_said(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5
                                             else "")


def split_summary(name: str, split: str, path: Path | str, fmt: str, records: int,
                  lengths: list[tuple[int, int, int]], tokenizer: Any, *, max_seq_length: int,
                  batch_size: int | None, batched: bool, unit: str = "line"
                  ) -> tuple[SplitReport, list[str], list[str]]:
    """One checked split's report, problems and warnings: a split mlx-lm batches (train, valid,
    test when tested) must hold a batch; sequences over ``max_seq_length`` are truncated."""
    problems, warnings = [], []
    if records and batch_size is not None and records < batch_size and batched:
        # mlx-lm's iterate_batches refuses a split smaller than one batch (valid included,
        # since evaluation batches it the same way).
        problems.append(
            f"{name}: {records} records, fewer than batch_size {batch_size}. Fix: add "
            f"records or lower batch_size to at most {records}"
        )
    too_long = [(n, line) for line, n, _ in lengths if n > max_seq_length]
    longest = max((n for _, n, _ in lengths), default=None) if tokenizer is not None else None
    # mask_prompt: a record whose prompt fills max_seq_length keeps no token to train on; a
    # batch of only such records fails its step (it failed at iteration 1 on the worker, after
    # placement, with only the truncation warning at submit: an outside run).
    empty = [line for line, n, offset in lengths
             if offset and target_count(n, offset, max_seq_length) == 0]
    if empty and len(empty) == len(lengths) and batched:
        problems.append(
            f"{name}: with mask_prompt, no record keeps a completion token within "
            f"max_seq_length {max_seq_length} (every prompt fills it; {unit}s "
            f"{_lines_said(empty)}). Fix: raise max_seq_length, or shorten the prompts")
    elif empty:
        warnings.append(
            f"{name}: with mask_prompt, {len(empty)} of {records} records keep no completion "
            f"token within max_seq_length {max_seq_length} ({unit}s {_lines_said(empty)}): "
            "they train nothing, and a batch of only such records fails its step")
    if too_long:
        n_max, line_max = max(too_long)
        warnings.append(
            f"{name}: {len(too_long)} of {records} records are longer than "
            f"max_seq_length {max_seq_length} tokens (longest {n_max} tokens, {unit} "
            f"{line_max}); they will be truncated to {max_seq_length}"
        )
    report = SplitReport(split, Path(path), records, fmt, len(too_long), longest)
    return report, problems, warnings


def check_dataset(
    data_dir: str | Path,
    *,
    max_seq_length: int = 2048,
    tokenizer: Any = None,
    mask_prompt: bool = False,
    need_train: bool = True,
    need_valid: bool = True,
    need_test: bool = False,
    batch_size: int | None = None,
    val_batches: int = -1,
    text_feature: str = "text",
    prompt_feature: str = "prompt",
    completion_feature: str = "completion",
    chat_feature: str = "messages",
    shown_as: str | None = None,
) -> DatasetReport:
    """Check an mlx-lm data folder; raise one DatasetError listing every problem found.

    ``tokenizer`` (a transformers tokenizer or mlx-lm's TokenizerWrapper) enables the token-length
    check and the chat template's verdict; without it the check is structural only. ``shown_as``
    names the folder in messages when ``data_dir`` is a stand-in (the coordinator's view of an
    uploaded dataset).
    """
    data_dir = Path(data_dir)
    shown = shown_as or str(data_dir)
    if not data_dir.is_dir():
        looked = "" if data_dir.is_absolute() else f" (looked for {data_dir.resolve()})"
        raise DatasetError(
            f"dataset {data_dir} is not a local folder{looked}",
            hint="give a local folder with train.jsonl and valid.jsonl (and optionally "
            "test.jsonl), or a Hugging Face dataset (hf_dataset, or a hub id as data); "
            "relative paths resolve from the current folder, as in mlx_lm.lora",
        )
    feats = Features(text_feature, prompt_feature, completion_feature, chat_feature)
    needed = {"train": need_train, "valid": need_valid, "test": need_test}
    problems: list[str] = []
    warnings: list[str] = []
    splits: dict[str, SplitReport] = {}
    sha256: dict[str, str] = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if path.exists() and not path.is_file():
            problems.append(f"{path.name} in {shown} is a folder, not a file. Fix: make it "
                            "the JSONL file itself")
            continue
        if not path.is_file():
            if needed[split]:
                problems.append(f"{path.name}: missing from {shown}. Fix: add {path.name}"
                                + (" (the training split is required)" if split == "train" else
                                   f" or turn off the {split} step"))
            elif split == "valid" and need_train:
                warnings.append(f"{path.name} not found in {shown}: training proceeds "
                                "without validation")
            continue
        result = _check_file(path, feats, tokenizer, mask_prompt)
        used = needed[split] or (split == "valid" and need_train)
        if not used:  # (test.jsonl of a job that does not test): mlx-lm parses its lines and
            # never renders a record, so only a line that is not JSON fails it
            check = result.check
            for key in [k for k in check.issues if k != "json"]:
                check.warned[key] = check.issues.pop(key)
                check.warned[key].fix += f" (the {split} split is not used by this job)"
        sha256[path.name] = result.sha256
        problems += result.check.messages()
        warnings += result.check.warnings()
        report, p, w = split_summary(
            path.name, split, path, result.format, result.records, result.lengths, tokenizer,
            max_seq_length=max_seq_length, batch_size=batch_size,
            # (val_batches 0: mlx-lm's evaluate draws no batch, so a small valid set is fine)
            batched=used and not (split == "valid" and val_batches == 0))
        splits[split], problems, warnings = report, problems + p, warnings + w
    if problems:
        raise DatasetError(
            f"dataset {shown} has {len(problems)} problem(s):\n  " + "\n  ".join(problems),
            hint=FORMATS_HELP,
        )
    # The warnings travel in the report: the caller shows them (the CLI prints, the service
    # stores them with the job), so they are not logged twice here.
    logger.info("dataset_checked", data=str(data_dir), warnings=len(warnings),
                **{f"{s.name}_records": s.records for s in splits.values()})
    return DatasetReport(splits=splits, warnings=warnings, sha256=sha256)


def reads_hub_dataset(cfg: Any) -> bool:
    """Whether mlx-lm would read this job's data through ``datasets``: ``hf_dataset`` is set, or
    ``data`` is no existing path (a hub id such as ``mlx-community/WikiSQL``). A ``data`` that
    is written as a path (``./data``, ``/x``, ``~/x``) and is missing is a missing folder."""
    if getattr(cfg, "hf_dataset", None):
        return True
    data = str(cfg.data)
    return not Path(data).expanduser().exists() and not data.startswith(("/", ".", "~"))


def check_job_dataset(cfg: Any, tokenizer: Any = None, shown_as: str | None = None
                      ) -> DatasetReport:
    """``check_dataset`` with a job config's settings (a ``herd.config.JobConfig``, or any object
    with mlx-lm's option names; the ``*_feature`` keys are read when the config has them).

    valid.jsonl is optional, as in ``mlx_lm.lora`` (a warning), so an mlx-lm job runs unchanged.
    Where mlx-lm would read a Hugging Face dataset (``hf_dataset``, or ``data`` that is no local
    path), it is loaded through ``datasets`` and its records checked the same way
    (herd/hf_dataset.py).
    """
    trains = cfg.trains() if hasattr(cfg, "trains") else True
    if reads_hub_dataset(cfg):
        from herd.hf_dataset import check_hub_dataset

        return check_hub_dataset(cfg, tokenizer, trains)
    return check_dataset(
        cfg.data,
        max_seq_length=cfg.max_seq_length,
        tokenizer=tokenizer,
        mask_prompt=cfg.mask_prompt,
        need_train=trains,
        need_valid=False,
        need_test=bool(getattr(cfg, "test", False)),
        batch_size=cfg.batch_size,
        val_batches=getattr(cfg, "val_batches", -1),
        text_feature=getattr(cfg, "text_feature", None) or "text",
        prompt_feature=getattr(cfg, "prompt_feature", None) or "prompt",
        completion_feature=getattr(cfg, "completion_feature", None) or "completion",
        chat_feature=getattr(cfg, "chat_feature", None) or "messages",
        shown_as=shown_as,
    )


def load_tokenizer_for(model_path: str | Path) -> Any:
    """The tokenizer of a local model folder, or None when ``model_path`` is not one (a hub id
    on a laptop without the weights): then the check is structural only."""
    path = Path(model_path)
    if not path.is_dir() or not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer  # heavy import; only when there is a tokenizer to load

    return AutoTokenizer.from_pretrained(str(path))
