"""Calibration data that used to give wrong targets or a bare traceback: a chat that opens with
the assistant, unknown roles, a tokenizer without pad or EOS token, invalid UTF-8, huge CSV
cells, deeply nested JSON, a chat template that refuses a conversation."""

from __future__ import annotations

import json
import warnings

import pytest

from domlora_kernels.data import (ChatTemplateFallbackWarning, UnknownRoleWarning, collate, encode, make_batches,
                                  read_records)


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from domlora_kernels.models import _source

    return AutoTokenizer.from_pretrained(_source(None, True)[0])


def _targets(enc) -> list[int]:
    return [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]


# ------------------------------------------------------------------ 4. a chat that opens with the assistant
def test_first_assistant_turn_targets_only_its_content(smol_tok):
    """SmolLM2's template adds its default system prompt before the first message; for a chat
    that opens with an assistant turn neither it nor the assistant header may be targets."""
    msgs = [{"role": "assistant", "content": "Hello there, friend."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bye now."}]
    enc = encode({"messages": msgs}, smol_tok, max_length=512)
    full = smol_tok.apply_chat_template(msgs, tokenize=False)
    assert full.startswith("<|im_start|>system\nYou are a helpful AI assistant")  # the template's default system prompt
    assert smol_tok.decode(enc["input_ids"]) == full
    assert smol_tok.decode(_targets(enc)) == "Hello there, friend.<|im_end|>\nBye now.<|im_end|>\n"
    header = set(smol_tok("<|im_start|>system\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    first = enc["labels"].index(next(lab for lab in enc["labels"] if lab != -100))
    assert not header & set(enc["labels"][:first + 1]) - {-100}
    assert smol_tok.decode(enc["input_ids"][:first]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the same assistant turn after a user turn has the same targets it has always had
    later = encode({"messages": [{"role": "user", "content": "Hi"}] + msgs[:1]}, smol_tok, max_length=512)
    assert smol_tok.decode(_targets(later)) == "Hello there, friend.<|im_end|>\n"


def test_template_that_refuses_a_conversation_names_the_record(smol_tok):
    tok = type(smol_tok).from_pretrained(smol_tok.name_or_path)
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with "
                         "the user') }}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=r"record 1: the tokenizer's chat template refuses this conversation .*start "
                                         r"with the user"):
        make_batches([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                      {"messages": [{"role": "assistant", "content": "b"}]}], tok)


# ------------------------------------------------------------------ 17. unknown roles
def test_unknown_role_is_rendered_and_warned_about(smol_tok):
    msgs = [{"role": "wizard", "content": "Speak, friend."}, {"role": "assistant", "content": "Mellon."}]
    with pytest.warns(UnknownRoleWarning, match=r"'wizard' \(first in record 1\).*no targets; check the role names"):
        (batch,) = make_batches([{"text": "plain text here"}, {"messages": msgs}], smol_tok, batch_size=2)
    ids, labels = batch["input_ids"][1].tolist(), batch["labels"][1].tolist()
    text = smol_tok.decode([i for i, m in zip(ids, batch["attention_mask"][1].tolist()) if m])
    assert "<|im_start|>wizard\nSpeak, friend.<|im_end|>" in text  # as the template renders it
    assert smol_tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "Mellon.<|im_end|>\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownRoleWarning)
        make_batches([{"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]}], smol_tok)


def test_unknown_role_in_the_plain_rendering_warns_too(smol_tok):
    tok = type(smol_tok).from_pretrained(smol_tok.name_or_path)
    tok.chat_template = None
    with pytest.warns(UnknownRoleWarning), pytest.warns(ChatTemplateFallbackWarning):
        make_batches([{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}], tok)


def test_sharegpt_roles_name_the_roles():
    from domlora_kernels.data import _validate_record

    with pytest.raises(ValueError, match=r"no assistant message \(roles: 'gpt', 'human'\).*'user'/'assistant'"):
        _validate_record({"messages": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}]}, "r")


# ------------------------------------------------------------------ 12. no pad and no EOS token
def test_tokenizer_without_pad_or_eos_says_set_pad_token():
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    assert tok.pad_token_id is None and tok.eos_token_id is None
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token.*set tokenizer.pad_token"):
        make_batches([{"text": "a b a"}, {"text": "b a"}], tok)
    with pytest.raises(ValueError, match=r"set tokenizer.pad_token"):
        collate([{"input_ids": [1, 2], "labels": [1, 2]}], None)
    tok.pad_token = tok.unk_token  # the fix the message gives
    assert make_batches([{"text": "a b a"}, {"text": "b a"}], tok)[0]["input_ids"].tolist() == [[1, 2, 1], [2, 1, 0]]


# ------------------------------------------------------------------ 15. bytes and cells the readers cannot take
@pytest.mark.parametrize("suffix,content,line", [
    (".jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
    (".json", b'[\n{"text": "ok"},\n{"text": "\xff"}\n]', 3),
    (".csv", b'text\nok\n"bad \xc3\x28"\n', 3),
])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix, content, line):
    f = tmp_path / f"d{suffix}"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{str(f)}:{line}: not UTF-8 text \(byte 0x.. at column \d+\): save the file as UTF-8"):
        read_records(f)


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"\xef\xbb\xbftext\nhello\n")  # as Excel writes CSV
    assert read_records(f) == [{"text": "hello"}]


def test_csv_cell_over_the_field_limit_names_file_and_line(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text\nshort\n" + "x" * (200 * 1024) + "\n")
    with pytest.raises(ValueError, match=rf"^{str(f)}:3: not valid CSV \(field larger than field limit .*give long "
                                         r"texts as .jsonl"):
        read_records(f)


@pytest.mark.parametrize("suffix,text,line", [
    (".jsonl", '{"text": "ok"}\n' + "[" * 100000 + "\n", 2),
    (".json", '[{"text": "ok"},\n' + "[" * 100000 + "]" * 100000 + "]", 2),
    (".jsonl", '{"text": "ok"}\n{"text": 1' + "0" * 5000 + "}\n", 2),
])
def test_unreadable_json_names_file_and_line(tmp_path, suffix, text, line):
    f = tmp_path / f"d{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError, match=rf"^{str(f)}:{line}: not (valid|readable) JSON"):
        read_records(f)


def test_csv_messages_cell_nested_too_deeply(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('messages\n"' + "[" * 100000 + '"\n')
    with pytest.raises(ValueError, match=rf"^{str(f)}:2: 'messages' must hold a JSON list .*nested too deeply"):
        read_records(f)


def test_json_string_with_line_separator_is_one_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")  # U+2028 is legal inside JSON strings
    assert read_records(f) == [{"text": "a\u2028b"}]
