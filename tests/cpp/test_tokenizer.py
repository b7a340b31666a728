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


# ------------------------------------------------------------------------------ SentencePiece
UNICODE = ["café au lait", "ﬁne ＡＢＣ", "a\u3000red\xa0square", "日本語のテキスト", "a 🎉 party", "naïve\u200bword",
           "<extra_id_0> red square", "a red</s>square<pad>", "  ", "Ünïcödé   spaces\t\n"]


def make_t5_tokenizer(root: Path, vocab_size: int = 48, extra_ids: int = 3) -> Path:
    """A T5-layout SentencePiece tokenizer (pad 0, eos 1, unk 2, ``extra_ids`` <extra_id_N>) trained on the
    synthetic prompts, saved as transformers saves a released T5/UMT5 checkpoint's: tokenizer.json
    (Unigram, converted from the model) next to spiece.model, in ``root / "tokenizer"``."""
    import io
    import shutil

    import sentencepiece
    from transformers import T5Tokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(held_out_prompts(400, seed=7) + ["café naïve été", "日本語 テキスト"]),
        model_writer=model, vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2)
    (root / "src").mkdir(parents=True)
    (root / "src" / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(root / "src", extra_ids=extra_ids).save_pretrained(root / "tokenizer")
    shutil.copy(root / "src" / "spiece.model", root / "tokenizer" / "spiece.model")
    return root / "tokenizer"


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    return make_t5_tokenizer(tmp_path_factory.mktemp("t5-tokenizer"))


def test_the_build_reads_sentencepiece(cpp_build):
    """The README's test command installs libsentencepiece-dev: the C++ tokenizer must have been built with it."""
    cache = (cpp_build / "CMakeCache.txt").read_text()
    assert "SENTENCEPIECE_LIBRARY:FILEPATH=" in cache and "SENTENCEPIECE_LIBRARY-NOTFOUND" not in cache, \
        "libsentencepiece not found: apt-get install libsentencepiece-dev (the README's test command does)"


def test_sentencepiece_ids_and_mask_equal_transformers(lib, t5_tokenizer):
    """A released T5/UMT5 checkpoint's tokenizer read with the sentencepiece library gives transformers'
    ids and mask: held-out and awkward prompts, UTF-8 text, special tokens inside the text, truncation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(t5_tokenizer)
    assert json.loads((t5_tokenizer / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    status, handle, message = load(lib, t5_tokenizer / "tokenizer.json")
    assert status == OK, message
    try:
        for max_length in (1, 4, 16, 64):
            for text in held_out_prompts(64) + AWKWARD + UNICODE:
                want = tok([text], padding="max_length", max_length=max_length, truncation=True,
                           return_attention_mask=True, add_special_tokens=True)
                full = len(tok([text], add_special_tokens=True, verbose=False).input_ids[0])
                got = encode(lib, handle, text, max_length)
                assert got == (want.input_ids[0], want.attention_mask[0], full > max_length), (text, max_length)
        assert isinstance(encode(lib, handle, "a red \xff square", 8)[0], list)  # 'ÿ' as UTF-8 is fine
        bad = (ctypes.c_longlong * 8)(), (ctypes.c_longlong * 8)(), ctypes.c_int()
        assert lib.fs_tokenizer_encode(handle, b"a red \xff square", 8, bad[0], bad[1], ctypes.byref(bad[2])) == VALUE
        assert lib.fs_last_error().decode() == "the prompt is not valid UTF-8: pass it as UTF-8 text"
    finally:
        lib.fs_tokenizer_destroy(handle)


def test_sentencepiece_refusals(lib, t5_tokenizer, tmp_path):
    import shutil

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(t5_tokenizer / "tokenizer.json", alone / "tokenizer.json")
    status, _, message = load(lib, alone / "tokenizer.json")
    assert status == CONFIG and "model Unigram is read from the SentencePiece model it was converted from, and " \
                                "there is no spiece.model next to it" in message, message
    other = tmp_path / "other"
    shutil.copytree(t5_tokenizer, other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"][5][0] = "\u2581zzz"
    (other / "tokenizer.json").write_text(json.dumps(data))
    status, _, message = load(lib, other / "tokenizer.json")
    assert status == CONFIG and "piece 5 is \"\u2581zzz\" there" in message and "not the same tokenizer" in message
    data = json.loads((t5_tokenizer / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps({**data, "pre_tokenizer": {"type": "ByteLevel"}}))
    status, _, message = load(lib, other / "tokenizer.json")
    assert status == CONFIG and "is not the SentencePiece conversion this runtime reads" in message, message
