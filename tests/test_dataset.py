"""herd.dataset: every error names the file, the lines and how many; lengths count like mlx-lm."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from herd.dataset import check_dataset, check_job_dataset, load_tokenizer_for
from herd.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]

CHAT = [{"role": "user", "content": "what colour is the cat?"},
        {"role": "assistant", "content": "the cat is red."}]


def write(folder: Path, name: str, records: list) -> Path:
    """Write a jsonl file; a str item is written verbatim as one line (to plant bad lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def texts(n: int, words: int = 3) -> list[dict]:
    return [{"text": " ".join(["the cat is red."] * words) + f" {i}"} for i in range(n)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write(d, "train.jsonl", texts(8))
    write(d, "valid.jsonl", texts(4))
    return d


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model: Path) -> Path:
    """A real model folder (tests/conftest.py): byte-level BPE tokenizer with a chat template."""
    return tiny_model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    tok = load_tokenizer_for(tokenizer_dir)
    assert tok is not None
    return tok


def error_of(*args, **kwargs) -> str:
    with pytest.raises(DatasetError) as e:
        check_dataset(*args, **kwargs)
    return str(e.value)


# ---- a good dataset -------------------------------------------------------------------------


def test_good_text_dataset_reports_counts_format_and_sha256(data: Path):
    report = check_dataset(data)
    assert report.splits["train"].records == 8
    assert report.splits["valid"].records == 4
    assert report.splits["train"].format == "text"
    assert report.splits["train"].longest is None  # no tokenizer, no lengths
    assert "test" not in report.splits
    assert report.warnings == []
    for name in ("train.jsonl", "valid.jsonl"):
        assert report.sha256[name] == hashlib.sha256((data / name).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "record, fmt, features",
    [
        ({"prompt": "what colour is the cat?", "completion": "red"}, "completions", {}),
        ({"messages": CHAT}, "chat", {}),
        ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools", {}),
        # mlx-lm's YAML options prompt_feature / completion_feature rename the keys.
        ({"input": "q", "output": "a"}, "completions",
         {"prompt_feature": "input", "completion_feature": "output"}),
        ({"chosen": CHAT}, "chat", {"chat_feature": "chosen"}),
        ({"body": "the cat is red."}, "text", {"text_feature": "body"}),
        # Keys the format does not use are ignored, as mlx-lm ignores them.
        ({"text": "the cat is red.", "id": 7, "source": "x"}, "text", {}),
    ],
)
def test_each_mlx_lm_format_is_recognised(tmp_path: Path, record, fmt, features):
    write(tmp_path, "train.jsonl", [record] * 3)
    write(tmp_path, "valid.jsonl", [record] * 2)
    report = check_dataset(tmp_path, **features)
    assert report.splits["train"].format == fmt
    assert report.splits["valid"].records == 2


@pytest.mark.parametrize("end", ["\r\n", "\r"])
def test_line_ends_are_read_as_mlx_lm_reads_them(data: Path, end: str):
    """mlx-lm reads a split with Python's text mode (``for l in open(path)``), where \n, \r\n
    and an old Mac's lone \r all end a line: a CR-only file was refused as one malformed line
    (an outside run). The same records, and a bad one named by its line."""
    from mlx_lm.tuner.datasets import load_local_dataset

    train = data / "train.jsonl"
    train.write_bytes(train.read_bytes().replace(b"\n", end.encode()))
    report = check_dataset(data)
    assert report.splits["train"].records == 8
    assert report.sha256["train.jsonl"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert len(load_local_dataset(data, None, type("C", (), {})())[0]) == 8  # (mlx-lm: the same)
    train.write_bytes(train.read_bytes().replace(b"}" + end.encode(), b"" + end.encode(), 1))
    assert "train.jsonl: 1 malformed JSON line (line 1)" in error_of(data)


# ---- each error names file, lines and count --------------------------------------------------


def test_malformed_json_lines_name_the_first_lines_and_the_total(data: Path):
    bad = ['{"text": "unterminated', "", "{'text': 'single quotes'}"]
    records = texts(2) + bad + texts(1) + [bad[0]] * 4 + texts(1)
    write(data, "train.jsonl", records)  # bad lines: 3, 4, 5, 7, 8, 9, 10
    msg = error_of(data)
    assert "train.jsonl: 7 malformed JSON lines (lines 3, 4, 5, 7, 8 and 2 more)" in msg
    assert "line 3: Unterminated string" in msg
    assert "valid.jsonl" not in msg  # the good file is not blamed


def test_blank_line_is_called_out(data: Path):
    write(data, "valid.jsonl", texts(2) + [""] + texts(1))
    msg = error_of(data)
    assert "valid.jsonl: 1 malformed JSON line (line 3); line 3: blank line" in msg


def test_line_that_is_not_an_object(data: Path):
    write(data, "train.jsonl", texts(3) + ['["the cat is red."]'])
    assert "train.jsonl: 1 line that is not a JSON object (line 4)" in error_of(data)


def test_record_without_known_keys_says_which_keys_it_has_and_which_are_known(data: Path):
    write(data, "train.jsonl", texts(2) + [{"question": "q", "answer": "a"}] * 3)
    msg = error_of(data)
    assert "train.jsonl: 3 records with none of the known keys (lines 3, 4, 5)" in msg
    assert "its keys are ['answer', 'question']" in msg
    assert "'text' | 'prompt'+'completion' | 'messages'" in msg


def test_first_record_without_known_keys_is_reported_not_taken_as_format(data: Path):
    write(data, "train.jsonl", [{"instruction": "x"}] + texts(3))
    msg = error_of(data)
    assert "train.jsonl: 1 record with none of the known keys (line 1)" in msg
    assert "in a" not in msg  # not also called a mix of formats


def test_mixed_formats_name_the_file_format_and_the_odd_lines(data: Path):
    odd = {"prompt": "what colour is the cat?", "completion": "red"}
    write(data, "valid.jsonl", texts(2) + [odd, {"messages": CHAT}, odd])
    msg = error_of(data)
    assert "valid.jsonl: 2 completions records in a text file (lines 3, 5)" in msg
    assert "valid.jsonl: 1 chat record in a text file (line 4)" in msg
    assert "first record (text, line 1)" in msg


def test_record_with_the_file_formats_keys_plus_others_is_not_a_mix(data: Path):
    # mlx-lm reads the "text" of this record and ignores the rest.
    write(data, "train.jsonl", texts(2) + [{"text": "t", "prompt": "p", "completion": "c"}])
    # ...but as a *first* record it makes the file completions, like mlx-lm's create_dataset.
    write(data, "valid.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}] + texts(1))
    msg = error_of(data)
    assert "train.jsonl" not in msg
    assert "valid.jsonl: 1 text record in a completions file (line 2)" in msg


def test_missing_train_split(tmp_path: Path):
    write(tmp_path, "valid.jsonl", texts(2))
    msg = error_of(tmp_path)
    assert f"train.jsonl: missing from {tmp_path}" in msg


def test_missing_valid_is_an_error_when_needed_and_a_warning_otherwise(tmp_path: Path):
    write(tmp_path, "train.jsonl", texts(4))
    assert "valid.jsonl: missing" in error_of(tmp_path)
    report = check_dataset(tmp_path, need_valid=False)
    assert any("valid.jsonl not found" in w for w in report.warnings)


def test_missing_test_only_when_needed(data: Path):
    check_dataset(data)
    assert "test.jsonl: missing" in error_of(data, need_test=True)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_empty_file_is_an_error_for_every_split(data: Path, split: str):
    # mlx-lm loads every split file present, and an empty one crashes its loader.
    (data / f"{split}.jsonl").write_text("")
    assert f"{split}.jsonl: the file is empty (0 records)" in error_of(data)


def test_fewer_records_than_batch_size(data: Path):
    # mlx-lm crashes on a validation set smaller than one batch (herd's trainer raises
    # ValueError): refused at check time, with the numbers
    msg = error_of(data, batch_size=6)
    assert "valid.jsonl: 4 records, fewer than batch_size 6" in msg
    assert "lower batch_size to at most 4" in msg
    assert "train.jsonl" not in msg  # 8 records are enough
    check_dataset(data, batch_size=4)
    # not trained, the validation set is not read: only the test set must hold a batch
    write(data, "test.jsonl", texts(5))
    msg = error_of(data, batch_size=6, need_train=False, need_valid=False, need_test=True)
    assert "test.jsonl: 5 records" in msg and "valid.jsonl" not in msg


@pytest.mark.parametrize(
    "messages, shown",
    [
        ([{"role": "asistant", "content": "x"}], "message 0 role 'asistant'"),
        ([{"role": "user", "content": "q"}, {"content": "a"}], "message 1 role null"),
        ([{"role": "human", "content": "q"}], "message 0 role 'human'"),
    ],
)
def test_unusual_roles_are_a_warning_naming_line_message_and_role(data: Path, messages, shown,
                                                                   tokenizer):
    """mlx-lm trains on whatever the chat template renders: an unusual role is not an error
    (with or without the tokenizer), but a warning with file, line and the usual roles."""
    write(data, "train.jsonl", [{"messages": CHAT}] * 2 + [{"messages": messages}])
    write(data, "valid.jsonl", [{"messages": CHAT}])
    for tok in (None, tokenizer):  # the tiny model's template renders any role
        report = check_dataset(data, tokenizer=tok)
        (warning,) = report.warnings
        assert warning.startswith("train.jsonl: 1 record with a message whose role is missing "
                                  "or unusual (line 3)")
        assert shown in warning and "'assistant'" in warning


def test_chat_data_for_a_tokenizer_without_a_chat_template_says_so(data: Path,
                                                                   tokenizer_dir: Path):
    """No template at all is the model's lack, not the records' fault (an outside run was told
    to fit the conversation to a template that does not exist)."""
    tok = load_tokenizer_for(tokenizer_dir)
    tok.chat_template = None
    write(data, "train.jsonl", [{"messages": CHAT}] * 2)
    write(data, "valid.jsonl", [{"messages": CHAT}])
    msg = error_of(data, tokenizer=tok)
    assert "train.jsonl: 2 records that need a chat template, which the model's tokenizer does " \
           "not have (lines 1, 2)" in msg and "use text data" in msg
    assert "roles, order" not in msg


def test_a_role_the_chat_template_rejects_is_an_error(data: Path, tokenizer_dir: Path):
    tok = load_tokenizer_for(tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'narrator'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    narrator = [{"role": "narrator", "content": "once"}] + CHAT  # this template's own role
    write(data, "train.jsonl", [{"messages": narrator}, {"messages": CHAT},
                                {"messages": [{"role": "asistant", "content": "x"}]}])
    write(data, "valid.jsonl", [{"messages": CHAT}])
    msg = error_of(data, tokenizer=tok)
    assert "train.jsonl: 1 record the chat template rejects (line 3)" in msg
    assert "unknown role asistant" in msg
    assert "line 1" not in msg  # a role the template knows is fine, usual or not


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"text": 42}, "1 record whose 'text' is not a string (line 2); line 2: 42"),
        ({"messages": []}, "1 record whose 'messages' is not a non-empty list (line 2)"),
    ],
)
def test_bad_value_types(data: Path, record, expected):
    """Without a tokenizer: what mlx-lm certainly fails on (encoding a number, a conversation
    that is not a list)."""
    first = {"messages": CHAT} if "messages" in record else texts(1)[0]
    write(data, "train.jsonl", [first, record])
    assert f"train.jsonl: {expected}" in error_of(data)


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "q", "completion": 42}, "1 record whose 'completion' is not a string (line 2)"),
        ({"messages": CHAT, "tools": {"f": 1}}, "1 record whose 'tools' is not a list (line 2)"),
        ({"text": ""}, "1 record with an empty 'text' (line 2)"),
    ],
)
def test_value_types_mlx_lm_may_accept_are_warnings(data: Path, record, expected):
    """A completion that is a number is rendered by the chat template (mlx-lm trains on it);
    without the tokenizer herd cannot tell whether an empty text or odd tools fail: a warning."""
    first = {k: v for k, v in record.items() if k != "tools"}
    first = {"messages": CHAT} if "messages" in record else (
        {"prompt": "q", "completion": "a"} if "prompt" in record else texts(1)[0])
    write(data, "train.jsonl", [first, record])
    write(data, "valid.jsonl", [first])
    report = check_dataset(data)
    assert [w for w in report.warnings if w.startswith(f"train.jsonl: {expected}")]


def test_a_completion_that_is_not_a_string_trains_in_mlx_lm(data: Path, tokenizer,
                                                           tokenizer_dir: Path):
    """The template renders it, so it is counted like mlx-lm's CompletionsDataset counts it."""
    records = [{"prompt": "what colour is the cat?", "completion": 7}] * 3
    write(data, "train.jsonl", records)
    write(data, "valid.jsonl", records)
    report = check_dataset(data, tokenizer=tokenizer, max_seq_length=4)
    assert report.splits["train"].longest == max(_mlx_lm_lengths(data, tokenizer_dir))


def test_an_empty_text_is_an_error_when_the_tokenizer_gives_no_tokens(data: Path, tokenizer):
    write(data, "train.jsonl", texts(2) + [{"text": ""}])
    msg = error_of(data, tokenizer=tokenizer)  # the tiny tokenizer adds no BOS
    assert "train.jsonl: 1 record with an empty 'text' (line 3)" in msg


def test_mask_prompt_needs_the_last_message_to_be_an_object(data: Path):
    write(data, "train.jsonl", [{"messages": CHAT}, {"messages": [CHAT[0], "a"]}])
    write(data, "valid.jsonl", [{"messages": CHAT}])
    check_dataset(data)  # without mask_prompt the template decides
    msg = error_of(data, mask_prompt=True)
    assert "train.jsonl: 1 record whose last message is not an object (line 2)" in msg


def test_feature_names_are_quoted_verbatim(data: Path):
    write(data, "train.jsonl", [{"{s}": "ok"}, {"{s}": 1}, {"{s}": 2}])
    msg = error_of(data, text_feature="{s}")
    assert "train.jsonl: 2 records whose '{s}' is not a string (lines 2, 3)" in msg


def test_mask_prompt_on_text_data_is_an_error(data: Path):
    msg = error_of(data, mask_prompt=True)
    assert "train.jsonl: mask_prompt is set but the data is text" in msg
    completions = [{"prompt": "q", "completion": "a"}] * 2
    write(data, "train.jsonl", completions)
    write(data, "valid.jsonl", completions)
    check_dataset(data, mask_prompt=True)


def test_all_problems_of_all_files_come_in_one_error(data: Path):
    write(data, "train.jsonl", texts(1) + ["{nope"])
    write(data, "valid.jsonl", [{"foo": 1}])
    (data / "test.jsonl").write_text("")
    msg = error_of(data)
    assert "has 3 problem(s)" in msg
    assert "train.jsonl: 1 malformed JSON line (line 2)" in msg
    assert "valid.jsonl: 1 record with none of the known keys (line 1)" in msg
    assert "test.jsonl: the file is empty" in msg
    assert "hint: mlx-lm reads one JSON object per line" in msg


def test_check_job_dataset_reads_mlx_lm_option_names(tmp_path: Path):
    from types import SimpleNamespace

    write(tmp_path, "train.jsonl", [{"input": "q", "output": "a"}] * 4)
    args = SimpleNamespace(data=str(tmp_path), max_seq_length=64, mask_prompt=True, batch_size=2,
                           test=False, prompt_feature="input", completion_feature="output")
    report = check_job_dataset(args)  # no valid.jsonl: a warning, as in mlx_lm.lora
    assert report.splits["train"].format == "completions"
    assert any("valid.jsonl not found" in w for w in report.warnings)
    args.batch_size = 5
    with pytest.raises(DatasetError, match="train.jsonl: 4 records, fewer than batch_size 5"):
        check_job_dataset(args)


def test_data_that_is_not_a_local_folder(tmp_path: Path):
    msg = error_of(tmp_path / "nope")
    assert f"dataset {tmp_path / 'nope'} is not a local folder" in msg


# ---- token lengths ---------------------------------------------------------------------------


def test_long_sequences_are_a_warning_naming_file_count_and_longest(data: Path, tokenizer):
    write(data, "train.jsonl", texts(6, words=2) + texts(1, words=40) + texts(2, words=20))
    report = check_dataset(data, tokenizer=tokenizer, max_seq_length=60)
    train = report.splits["train"]
    assert train.too_long == 3
    assert train.longest is not None and train.longest > 60
    (warning,) = report.warnings
    assert warning.startswith(
        "train.jsonl: 3 of 9 records are longer than max_seq_length 60 tokens"
    )
    assert f"(longest {train.longest} tokens, line 7)" in warning
    assert "truncated to 60" in warning
    assert report.splits["valid"].too_long == 0


def _mlx_lm_lengths(folder: Path, tokenizer_dir: Path, **features) -> list[int]:
    """Token counts exactly as mlx-lm's own loader and dataset classes produce them."""
    from types import SimpleNamespace

    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from mlx_lm.tuner.datasets import load_local_dataset

    tok = load_mlx_tokenizer(tokenizer_dir)
    train, _, _ = load_local_dataset(folder, tok, SimpleNamespace(mask_prompt=False, **features))
    return [len(train.process(train[i])[0]) for i in range(len(train))]


@pytest.mark.parametrize(
    "records, features",
    [
        (texts(5, words=1) + texts(3, words=9), {}),
        ([{"q": "what colour is the " + "cat " * i, "a": "red." * i} for i in range(1, 8)],
         {"prompt_feature": "q", "completion_feature": "a"}),
        ([{"messages": [{"role": "system", "content": "be brief " * i}] + CHAT}
          for i in range(6)], {}),
    ],
    ids=["text", "completions", "chat"],
)
def test_lengths_match_mlx_lm_dataset_classes(
    tmp_path, tokenizer, tokenizer_dir, records, features
):
    write(tmp_path, "train.jsonl", records)
    write(tmp_path, "valid.jsonl", records[:1])
    expected = _mlx_lm_lengths(tmp_path, tokenizer_dir, **features)
    limit = sorted(expected)[len(expected) // 2]  # about half the records are over it
    report = check_dataset(tmp_path, tokenizer=tokenizer, max_seq_length=limit, **features)
    assert report.splits["train"].longest == max(expected)
    assert report.splits["train"].too_long == sum(n > limit for n in expected)


def test_records_the_chat_template_rejects_are_errors(data: Path, tokenizer_dir: Path):
    tok = load_tokenizer_for(tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    swapped = [CHAT[1], CHAT[0]]
    write(data, "train.jsonl", [{"messages": CHAT}, {"messages": swapped}, {"messages": swapped}])
    write(data, "valid.jsonl", [{"messages": CHAT}])
    msg = error_of(data, tokenizer=tok)
    assert "train.jsonl: 2 records the chat template rejects (lines 2, 3)" in msg
    assert "roles must alternate user/assistant" in msg


def test_mask_prompt_on_a_conversation_without_a_prompt_is_an_error(data: Path, tokenizer):
    """A conversation of one assistant message, with mask_prompt: mlx-lm renders every message
    but the last to find the prompt's length, and transformers refuses an empty conversation,
    mid-training. The check said ok and the run died with no file or line (an outside run)."""
    alone = {"messages": [CHAT[1]]}
    write(data, "train.jsonl", [{"messages": CHAT}, alone, {"messages": CHAT}, alone])
    write(data, "valid.jsonl", [{"messages": CHAT}])
    check_dataset(data, tokenizer=tokenizer)  # without mask_prompt it trains on everything
    msg = error_of(data, tokenizer=tokenizer, mask_prompt=True)
    assert ("train.jsonl: 2 records whose prompt (every message but the last) the chat "
            "template cannot render, as mask_prompt needs (lines 2, 4)") in msg, msg
    assert "empty conversation" in msg and "drop mask_prompt" in msg


def test_load_tokenizer_for_a_path_without_a_model_is_none(tmp_path: Path):
    assert load_tokenizer_for("Qwen/Qwen3-0.6b") is None
    assert load_tokenizer_for(tmp_path) is None


def test_the_check_does_not_import_mlx(data: Path):
    # It runs on a laptop at `herd submit`, where MLX may not be installed.
    code = (
        "import sys; from herd.dataset import check_dataset; "
        f"r = check_dataset({str(data)!r}); "
        "assert r.splits['train'].records == 8; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
