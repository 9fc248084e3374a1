"""The MultiSlot reader: the real sample file, round trips, bad lines, pipe commands."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.worker.data import (BadLineError, Batch, DataError, MultiSlotReader, PipeCommandError, Slot, SlotList,
                               format_multislot, parse_multislot, write_multislot)
from tests.worker.data.helpers import SAMPLE, block_from_rows, block_rows, reference_parse

needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"sample data not found at {SAMPLE} "
                                  "(the shared/ folder beside the repository)")
CTR = SlotList.ctr()


# ---- the real sample file ----

@needs_sample
@pytest.mark.parametrize("threads", [1, 3])
def test_sample_file_matches_reference(threads):
    text = SAMPLE.read_text()
    ref = reference_parse(text, CTR)
    block = MultiSlotReader(CTR, n_threads=threads, min_chunk_bytes=4096).read_file(SAMPLE)
    assert block.size == len(ref) == 2000
    got = block_rows(block)
    for i in (0, 1, 2, 999, 1998, 1999):
        assert got[i] == ref[i]
    assert got == ref
    assert block.dense["label"].shape == (2000, 1) and block.dense["dense"].shape == (2000, 13)
    assert block.dense["label"].dtype == np.float32 and block.sparse["C1"].values.dtype == np.uint64
    assert 0.26 < block.dense["label"].mean() < 0.32
    for s in range(26):
        r = block.sparse[f"C{s + 1}"]
        assert (r.lengths == 1).all()
        assert r.values.min() >= s * 10**6 + 1 and r.values.max() <= (s + 1) * 10**6


@needs_sample
def test_sample_file_writes_back_identically(tmp_path):
    block = MultiSlotReader(CTR).read_file(SAMPLE)
    out = tmp_path / "copy.txt"
    assert write_multislot(block, out) == 2000
    assert out.read_bytes() == SAMPLE.read_bytes()


# ---- round trips over random slot lists ----

@st.composite
def slot_lists_and_rows(draw):
    n_slots = draw(st.integers(1, 5))
    slots = []
    for i in range(n_slots):
        kind = draw(st.sampled_from(["dense", "ids", "sparse_float"]))
        if kind == "dense":
            slots.append(Slot(f"s{i}", "float", dense=True, dim=draw(st.integers(1, 4))))
        else:
            slots.append(Slot(f"s{i}", "uint64" if kind == "ids" else "float"))
    slots = SlotList(slots)
    floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
    ids = st.integers(0, 2**64 - 1)
    rows = []
    for _ in range(draw(st.integers(0, 25))):
        row = []
        for s in slots:
            n = s.dim if s.dense else draw(st.integers(1, 4))
            row.append(draw(st.lists(floats if s.dtype == "float" else ids, min_size=n, max_size=n)))
        rows.append(row)
    return slots, rows


def python_writer(rows, data) -> str:
    """MultiSlot text with random separators, CRLF, blank lines and maybe no final newline."""
    lines = []
    for row in rows:
        toks = []
        for vals in row:
            toks.append(str(len(vals)))
            toks += [repr(v) if isinstance(v, float) else str(v) for v in vals]
        sep = data.draw(st.sampled_from([" ", "  ", "\t", " \t"]))
        lines.append(sep.join(toks) + data.draw(st.sampled_from(["", " ", "\r", "  \r"])))
        if data.draw(st.booleans()) and data.draw(st.booleans()):
            lines.append(data.draw(st.sampled_from(["", "   ", "\r", "\t"])))
    text = "\n".join(lines)
    return text + ("\n" if data.draw(st.booleans()) else "")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=slot_lists_and_rows(), threads=st.integers(1, 4), data=st.data())
def test_round_trip_random_slots(case, threads, data):
    slots, rows = case
    expected = block_from_rows(rows, slots)
    # the native writer (exact floats) ...
    text = format_multislot(expected, decimals=None)
    got = parse_multislot(text, slots, n_threads=threads, min_chunk_bytes=1)
    assert got.equals(expected)
    # ... and a Python writer with every separator and line-end variation
    text = python_writer(rows, data)
    got = parse_multislot(text, slots, n_threads=threads, min_chunk_bytes=1)
    assert got.equals(expected), text


def test_chunked_file_reading_keeps_line_numbers(tmp_path):
    good = "1 0.5 2 7 8\n"
    p = tmp_path / "f.txt"
    p.write_text(good * 500 + "\n" + good * 99 + "1 0.5 2 7\n" + good)
    slots = SlotList([Slot("x", "float", dense=True, dim=1), Slot("ids", "uint64")])
    reader = MultiSlotReader(slots, chunk_bytes=64, min_chunk_bytes=16, n_threads=4)
    with pytest.raises(BadLineError) as e:
        reader.read_file(p)
    assert e.value.line == 601 and f"{p}:601:" in str(e.value)
    reader = MultiSlotReader(slots, chunk_bytes=64, min_chunk_bytes=16, n_threads=4, on_bad_line="skip")
    block = reader.read_file(p)
    assert block.size == 600 and reader.bad_lines == 1 and reader.lines_read == 602
    assert reader.bad_line_examples[0].startswith(f"{p}:601: slot 'ids'")


def test_empty_and_blank_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n  \r\n\t\n")
    for name in ("empty.txt", "blank.txt"):
        block = MultiSlotReader(CTR).read_file(tmp_path / name)
        assert block.size == 0 and block.dense["dense"].shape == (0, 13) and block.sparse["C3"].offsets.tolist() == [0]


# ---- bad lines ----

SLOTS3 = SlotList([Slot("label", "float", dense=True, dim=1), Slot("d", "float", dense=True, dim=2),
                   Slot("ids", "uint64")])
GOOD = "1 1 2 0.5 0.25 2 11 12"
BAD = [  # (line, slot named in the error, words of the reason)
    ("1 1 3 0.5 0.25 0.1 2 11 12", "d", "count 3 but this dense slot has dim 2"),
    ("1 1 2 0.5 0.25 3 11 12", "ids", "only 2 values left"),
    ("1 1 2 0.5 abc 2 11 12", "d", "'abc' is not a number"),
    ("1 1 2 0.5 0.25 2 11 x1", "ids", "'x1' is not an unsigned integer"),
    ("1 1 2 0.5 0.25 2 11 -12", "ids", "'-12' is negative"),
    ("1 1 2 0.5 0.25 1 18446744073709551616", "ids", "does not fit in uint64"),
    ("1 1 2 0.5 0.25 2 11 12 99", None, "extra tokens after the last slot"),
    ("1 1 2 0.5 0.25 0", "ids", "count 0"),
    ("1 1 2 0.5 0.25", "ids", "the line ends before this slot's count"),
    ("1 1 two 0.5 0.25 2 11 12", "d", "count 'two' is not a non-negative integer"),
    ("1 nan 2 0.5 0.25 2 11 12", "label", "'nan' is not a finite number"),
    ("1 1 2 0.5 1e39 2 11 12", "d", "out of float32 range"),
]


@pytest.mark.parametrize("line,slot,reason", BAD)
def test_bad_line_fail_mode_names_file_line_slot(tmp_path, line, slot, reason):
    p = tmp_path / "bad.txt"
    p.write_text(f"{GOOD}\n{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(BadLineError) as e:
        MultiSlotReader(SLOTS3).read_file(p)
    err = e.value
    assert isinstance(err, DataError)
    assert err.line == 3 and err.slot == slot and reason in err.reason
    msg = str(err)
    assert msg.startswith(f"{p}:3: ") and reason in msg
    if slot:
        assert f"slot {slot!r}" in msg


def test_bad_lines_skip_mode_counts_and_keeps_good_lines(tmp_path):
    lines = []
    for bad, _, _ in BAD:
        lines += [GOOD, bad]
    p = tmp_path / "bad.txt"
    p.write_text("\n".join(lines + [GOOD]))
    for threads in (1, 4):
        reader = MultiSlotReader(SLOTS3, on_bad_line="skip", n_threads=threads, min_chunk_bytes=8,
                                 max_bad_examples=5)
        block = reader.read_file(p)
        assert block.size == len(BAD) + 1
        assert block.sparse["ids"].values.tolist() == [11, 12] * block.size
        assert reader.bad_lines == len(BAD)
        assert len(reader.bad_line_examples) == 5
        assert reader.bad_line_examples[0] == f"{p}:2: slot 'd': count 3 but this dense slot has dim 2"
        assert reader.bad_line_examples[4].startswith(f"{p}:10: slot 'ids': id '-12' is negative")


def test_settings_are_checked():
    with pytest.raises(DataError, match="on_bad_line='ignore'"):
        MultiSlotReader(SLOTS3, on_bad_line="ignore")
    with pytest.raises(DataError, match="dense slots hold float features"):
        Slot("x", "uint64", dense=True, dim=2)
    with pytest.raises(DataError, match="duplicate slot names"):
        SlotList([Slot("a", "uint64"), Slot("a", "uint64")])
    with pytest.raises(DataError, match="cannot read data file"):
        MultiSlotReader(SLOTS3).read_file("/nonexistent/part-0.txt")


# ---- pipe_command ----

def test_pipe_cat_equals_direct_read(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("\n".join([GOOD] * 300) + "\n")
    direct = MultiSlotReader(SLOTS3).read_file(p)
    piped = MultiSlotReader(SLOTS3, pipe_command="cat", chunk_bytes=100).read_file(p)
    assert piped.equals(direct) and piped.size == 300
    # a command that rewrites lines: set every label to 0
    awk = MultiSlotReader(SLOTS3, pipe_command="awk '{$2 = 0; print}'").read_file(p)
    assert (awk.dense["label"] == 0).all() and awk.sparse["ids"].equals(direct.sparse["ids"])


@pytest.mark.parametrize("command,code,words", [
    ("no_such_command_shoal_test", 127, "not found"),
    ("echo boom >&2; exit 3", 3, "boom"),
    ("head -n 2; echo died >&2; exit 1", 1, "died"),
    ("head -c 30; kill -9 $$", -9, "nothing to stderr"),
])
def test_failing_pipe_command(tmp_path, command, code, words):
    p = tmp_path / "d.txt"
    p.write_text("\n".join([GOOD] * 50) + "\n")
    with pytest.raises(PipeCommandError) as e:
        MultiSlotReader(SLOTS3, pipe_command=command).read_file(p)
    err = e.value
    assert err.returncode == code and err.command == command and err.path == str(p)
    assert command in str(err) and str(p) in str(err) and words in str(err)


def test_bad_line_through_pipe_names_command(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text(f"{GOOD}\n{GOOD}\n")
    with pytest.raises(BadLineError, match=r"through pipe_command 'sed s/11/x/'\):1: slot 'ids'"):
        MultiSlotReader(SLOTS3, pipe_command="sed s/11/x/").read_file(p)


def test_parse_accepts_memory_buffers():
    data = (GOOD + "\n").encode() * 3
    for buf in (data, bytearray(data), memoryview(data)):
        assert MultiSlotReader(SLOTS3).parse(buf).size == 3
    assert isinstance(parse_multislot(GOOD, SLOTS3), Batch)
