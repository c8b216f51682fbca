"""Text that must be encodable as UTF-8, checked where it is read, naming the record.

A JSON line may escape a lone surrogate (`"\\ud800"`): it decodes to a Python str that UTF-8
cannot encode, so a tokenizer, a writer or a log line fails on it later, naming no record. Bytes
that are not UTF-8 fail to decode. Both are refused where the record is read, with its file:line:
training records (`records.record_from_dict`, `records.parse_json_line`) and the tools' JSONL
inputs (`retrieval.corpus.JsonlCorpus`: `tools/embed.py`, mining's corpus). See docs/data.md,
"Validation".
"""

from __future__ import annotations


def utf8_error(where: str, err: UnicodeDecodeError) -> str:
    """The message for a line whose bytes are not UTF-8 (surrogates encoded as UTF-8 included):
    `{where}: not UTF-8 text (byte ff at byte 12 of the line: invalid start byte)`."""
    bad = err.object[err.start : err.end]
    return (
        f"{where}: not UTF-8 text (byte {bad[:4].hex(' ')} at byte {err.start} of the line: "
        f"{err.reason})"
    )


def _unencodable(value, path: str) -> tuple[str, str] | None:
    """(where in `value`, why) for the first text UTF-8 cannot encode, or None. `value`: a
    decoded JSON value; `path` names it (`key 'pos'`)."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # only a surrogate has no UTF-8 form
            return path, f"lone surrogate U+{ord(value[err.start]):04X} at character {err.start}"
        return None
    if isinstance(value, list):
        try:  # fast path: the texts joined, checked at once (str.join refuses a non-str item)
            joined = "".join(value)
            if joined.isascii():
                return None
            joined.encode("utf-8")
            return None
        except (TypeError, UnicodeEncodeError):
            pass  # a non-text item, or the text that fails is found below
        for i, item in enumerate(value):
            found = _unencodable(item, f"{path} item {i}")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(key, f"{path} key {key!r} (its name)") or _unencodable(
                item, f"{path} key {key!r}"
            )
            if found is not None:
                return found
    return None


def _all_encodable(obj: dict) -> bool:
    """True when the key names and the texts of `obj` (strings, lists of strings and lists of
    numbers: the shape of a record) join into one encodable text; False when they do not or `obj`
    holds other values (then `_unencodable` walks it). The fast path: one join and one encode per
    record."""
    texts = list(obj)
    for value in obj.values():
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            if value and not isinstance(value[0], str):  # numbers (teacher scores, ids)
                if all(isinstance(item, int | float) for item in value):
                    continue
                return False
            texts.extend(value)
        elif not (value is None or isinstance(value, int | float)):
            return False
    try:  # str.join refuses a non-str list item
        joined = "".join(texts)
        if not joined.isascii():
            joined.encode("utf-8")
    except (TypeError, UnicodeEncodeError):
        return False
    return True


def check_encodable(obj: dict, where: str) -> None:
    """Refuses a decoded JSONL object or table row holding text that UTF-8 cannot encode (a lone
    surrogate U+D800-U+DFFF, which JSON's `"\\ud800"` escapes give): a tokenizer, a writer or a
    log line would fail on it later, naming no record. Every string is checked: values, list
    items and nested ones, and the key names.

    Raises:
        ValueError: `{where}: key 'pos' item 1 cannot be encoded as UTF-8 (lone surrogate U+D800
            at character 0)`.
    """
    if _all_encodable(obj):
        return
    for key, value in obj.items():
        found = _unencodable(key, f"key {key!r} (its name)") or _unencodable(value, f"key {key!r}")
        if found is not None:
            path, why = found
            raise ValueError(f"{where}: {path} cannot be encoded as UTF-8 ({why})")
