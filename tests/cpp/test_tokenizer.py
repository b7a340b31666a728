"""libforesight's prompt tokenizer (cpp/src/tokenizer.cpp) through the C ABI against transformers'
tokenizer of every shipped preset: the ids and attention mask of the Python runtime's call
(``padding="max_length"``, ``truncation=True``) for held-out and awkward prompts at several lengths;
refusals with status codes and messages."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import pytest

from tools.synthetic import held_out_prompts

OK, ARGUMENT, CONFIG, VALUE = 0, 1, 2, 4
PRESETS = Path(__file__).resolve().parents[2] / "exporter" / "presets"
FOLDERS = sorted(p.parent.parent for p in PRESETS.glob("*/tokenizer/tokenizer.json"))
AWKWARD = ["", "   ", "A RED Square Moving LEFT", "a red, square!! moving... left?", "a\tred\nsquare\r\x0bleft\x0c",
           "  leading and trailing  ", "unknownword zebra 42 foo_bar", "a red</s>square </s></s>", "<pad> <unk>",
           "a-b c.d e,f (g) [h] {i} 'j' \"k\"", "x" * 300, " ".join(["red"] * 100), "\x01ctrl\x7f", "a__b 1_2 __"]


@pytest.fixture(scope="module")
def lib(cpp_build):
    lib = ctypes.CDLL(str(cpp_build / "libforesight.so"))
    lib.fs_last_error.restype = ctypes.c_char_p
    lib.fs_tokenizer_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.fs_tokenizer_destroy.argtypes = [ctypes.c_void_p]
    ll = ctypes.POINTER(ctypes.c_longlong)
    lib.fs_tokenizer_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ll, ll,
                                        ctypes.POINTER(ctypes.c_int)]
    return lib


def load(lib, path):
    handle = ctypes.c_void_p()
    status = lib.fs_tokenizer_load(str(path).encode(), ctypes.byref(handle))
    return status, handle, lib.fs_last_error().decode()


def encode(lib, handle, text: str, max_length: int):
    ids, mask, truncated = (ctypes.c_longlong * max_length)(), (ctypes.c_longlong * max_length)(), ctypes.c_int()
    status = lib.fs_tokenizer_encode(handle, text.encode(), max_length, ids, mask, ctypes.byref(truncated))
    if status != OK:
        return status, lib.fs_last_error().decode()
    return list(ids), list(mask), bool(truncated.value)


def test_every_preset_ships_a_tokenizer_this_test_reads():
    assert {p.name for p in FOLDERS} >= {"latte-tiny", "cogvideox-tiny", "opensora-tiny", "wan-tiny"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_ids_and_mask_equal_transformers(lib, folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    status, handle, message = load(lib, folder / "tokenizer" / "tokenizer.json")
    assert status == OK, message
    try:
        for max_length in (1, 4, 16, 64):
            for text in held_out_prompts(64) + AWKWARD:
                want = tok([text], padding="max_length", max_length=max_length, truncation=True,
                           return_attention_mask=True, add_special_tokens=True)
                full = len(tok([text], add_special_tokens=True, verbose=False).input_ids[0])
                got = encode(lib, handle, text, max_length)
                assert got == (want.input_ids[0], want.attention_mask[0], full > max_length), (text, max_length)
    finally:
        lib.fs_tokenizer_destroy(handle)


def test_refusals(lib, tmp_path):
    folder = PRESETS / "latte-tiny" / "tokenizer"
    status, handle, _ = load(lib, folder / "tokenizer.json")
    assert status == OK
    try:
        assert encode(lib, handle, "a red café", 16) == (VALUE, "the prompt has non-ASCII characters, which the C++ "
                                                        "word-level tokenizer does not read; write it in ASCII or "
                                                        "run foresight-run")
        assert encode(lib, handle, "a", 0) == (VALUE, "fs_tokenizer_encode: max_length must be >= 1")
        assert lib.fs_tokenizer_encode(handle, None, 4, None, None, None) == ARGUMENT
    finally:
        lib.fs_tokenizer_destroy(handle)
    status, _, message = load(lib, tmp_path / "nowhere.json")
    assert status == CONFIG and message == f"cannot read the tokenizer file {tmp_path / 'nowhere.json'}"
    (tmp_path / "broken.json").write_text("{")
    status, _, message = load(lib, tmp_path / "broken.json")
    assert status == CONFIG and message.startswith(f"{tmp_path / 'broken.json'} is not valid JSON")
    data = json.loads((folder / "tokenizer.json").read_text())
    for key, value, what in [("model", {**data["model"], "type": "BPE"}, "model BPE"),
                             ("normalizer", {"type": "NFKC"}, "normalizer NFKC"),
                             ("pre_tokenizer", {"type": "Metaspace"}, "pre_tokenizer Metaspace"),
                             ("post_processor", {"type": "RobertaProcessing"}, "post_processor RobertaProcessing")]:
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**data, key: value}))
        status, _, message = load(lib, path)
        assert status == CONFIG and message.startswith(f"{path}: {what} is not supported"), message
        assert "sentencepiece" in message
