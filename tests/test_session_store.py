"""The session store: segment format and checksums, the store's files and bound, restart / import on real weights."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import load_engine
from deltaserve.cache.session import MatchReason
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.store.disk import SessionStore
from deltaserve.tokens import common_prefix_len
from deltaserve.store.format import (Segment, SegmentCorrupt, Stamp, StampMismatch, decode_segment, encode_segment,
                                     pack_export, unpack_export)

STAMP = Stamp("ab" * 32, "float32", "float32", 2, 1, 4)


def seg(start: int, tokens: list[int], dtype=torch.float32) -> Segment:
    rows = torch.arange(2 * 2 * len(tokens) * 4, dtype=torch.float32).reshape(2, 2, len(tokens), 1, 4) + start
    return Segment(start, tokens, rows.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_round_trip_and_every_corruption_detected(dtype):
    s = seg(5, [7, 8, 9], dtype)
    data = encode_segment(s)
    back = decode_segment(data)
    assert (back.start, back.tokens) == (5, [7, 8, 9]) and torch.equal(back.rows, s.rows)
    for i in (0, 12, len(data) // 2, len(data) - 1):  # magic, header, rows, checksum
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(SegmentCorrupt):
            decode_segment(bytes(bad))
    with pytest.raises(SegmentCorrupt):
        decode_segment(data[:-7])  # torn


def test_stamp_mismatch_names_the_difference():
    other = Stamp("ab" * 32, "bfloat16", "bfloat16", 2, 1, 4)
    with pytest.raises(StampMismatch, match="dtype: 'bfloat16' .store. vs 'float32' .this server.") as e:
        STAMP.check(other, "the store")
    assert "weights_sha256" not in str(e.value)
    data = b"".join(pack_export(other, {"tokens": ""}, []))
    with pytest.raises(StampMismatch):
        unpack_export(data, STAMP)
    meta, segs = unpack_export(b"".join(pack_export(STAMP, {"x": 1}, [seg(0, [1, 2])])), STAMP)
    assert meta == {"x": 1} and segs[0].tokens == [1, 2]


def test_store_appends_truncates_restores_and_survives_a_corrupt_tail(tmp_path):
    st = SessionStore(tmp_path, STAMP)
    st.append("k1", seg(0, [1, 2, 3, 4]), {"session_id": "a"})
    st.append("k1", seg(4, [5, 6]), {"session_id": "a"})
    st.append("k1", seg(2, [9, 9, 9]), {"session_id": "a"})  # the state diverged at token 2: [2, 6) is replaced
    assert st.flush(10)
    files = sorted(p.name for p in (tmp_path / "sessions" / "k1").iterdir())
    assert files == ["00000001.kv", "00000003.kv", "meta.json"]  # the superseded segment file is gone
    meta = json.loads((tmp_path / "sessions" / "k1" / "meta.json").read_text())
    assert [(s["start"], s["end"]) for s in meta["segments"]] == [(0, 2), (2, 5)]
    got = st.read_segments("k1", 1, 5)
    assert [(g.start, g.tokens) for g in got] == [(1, [2]), (2, [9, 9, 9])]
    assert torch.equal(got[0].rows, seg(0, [1, 2, 3, 4]).rows[:, :, 1:2])
    # a new process: the same sessions; an orphan (crash between segment and metadata) is removed
    (tmp_path / "sessions" / "k1" / "00000009.kv").write_bytes(b"partial")
    again = SessionStore(tmp_path, STAMP)
    (found,) = again.scan()
    assert found.key == "k1" and found.meta["session_id"] == "a"
    assert not (tmp_path / "sessions" / "k1" / "00000009.kv").exists()
    # a flipped byte in the second segment: the first is still served, the tail is not
    p = tmp_path / "sessions" / "k1" / "00000003.kv"
    raw = bytearray(p.read_bytes())
    raw[40] ^= 1
    p.write_bytes(bytes(raw))
    assert [g.start for g in again.read_segments("k1", 0, 5)] == [0]
    with pytest.raises(StampMismatch):
        SessionStore(tmp_path, Stamp("cd" * 32, "float32", "float32", 2, 1, 4))


def test_store_bound_removes_oldest_closed_sessions_first(tmp_path):
    size = len(encode_segment(seg(0, [1] * 10)))
    st = SessionStore(tmp_path, STAMP, max_bytes=int(2.5 * size))
    for key in ("old", "live", "new"):
        st.set_live(key, key == "live")
        st.append(key, seg(0, [1] * 10), {"session_id": key})
        st.flush(10)
        time.sleep(0.01)  # distinct write times
    assert "old" not in st and "live" in st and "new" in st and st.nbytes <= 2.5 * size
    st.set_live("new", True)
    st.append("more", seg(0, [1] * 10), {"session_id": "more"})
    st.flush(10)
    assert "live" in st and "new" in st  # live sessions are never removed by the bound


# ------------------------------------------------------------------ real weights
GREEDY = SamplingParams(max_tokens=6)


@pytest.fixture(scope="module")
def ref(smollm_dir):
    return load_engine(smollm_dir, cache_mode=CacheMode.STATELESS, speculation=False)


def test_restart_restores_sessions_exactly(smollm_dir, ref, tmp_path):
    """Two sessions, 3 turns, in an engine with a store; a second engine on the same directory (a restart) lists
    them at once and continues each: outputs equal recompute, and the whole saved state is restored, not prefilled."""
    a = load_engine(smollm_dir, speculation=False, session_store=str(tmp_path))
    nexts = {}
    for sid in ("alpha", "beta"):
        a.open_session(sid, owner="key-1")
    tok = a.tokenizer
    states = {}
    for sid in ("alpha", "beta"):
        history = tok.apply_chat([{"role": "user", "content": f"You are agent {sid}. Plan a deployment."}])
        for i in range(3):
            seq = a.add_request(history, GREEDY, session_id=sid, owner="key-1")
            a.run_until_done([seq])
            history = seq.tokens + tok.encode(f" step {i}: read the file, then report")
        nexts[sid] = history
        states[sid] = list(a.get_session(sid).tokens)
    assert a.close(30)
    b = load_engine(smollm_dir, speculation=False, session_store=str(tmp_path))
    listed = {i.session_id: i for i in b.sessions.list("key-1")}
    assert set(listed) == {"alpha", "beta"} and b.sessions.list("key-2") == []
    assert all(i.state == "stored" and len(i.history) == 3 for i in listed.values())
    assert listed["alpha"].tokens == len(states["alpha"])
    for sid in ("alpha", "beta"):
        seq = b.add_request(nexts[sid], GREEDY, session_id=sid, owner="key-1")
        b.run_until_done([seq])
        assert seq.output_ids == ref.generate([nexts[sid]], GREEDY)[0]
        # the whole saved state is reused; beta's first tokens (the template's) came back with alpha already
        shared = 0 if sid == "alpha" else common_prefix_len(states["alpha"], states["beta"])
        assert seq.stats.cached_tokens == len(states[sid]) and seq.stats.restored_tokens == len(states[sid]) - shared
        assert seq.explanation.reason is MatchReason.RESTORED and "session store" in seq.explanation.detail
    with pytest.raises(KeyError):
        b.sessions.info("alpha", "key-2")  # another key's session does not exist for it, after a restart too


def test_corrupt_segment_loses_only_the_tail(smollm_dir, ref, tmp_path):
    a = load_engine(smollm_dir, speculation=False, session_store=str(tmp_path))
    tok = a.tokenizer
    history = tok.apply_chat([{"role": "user", "content": "Count the files in the repo."}])
    ends = []
    for i in range(2):
        seq = a.add_request(history, GREEDY, session_id="c", open_session=True)
        a.run_until_done([seq])
        ends.append(len(seq.tokens) - 1)
        history = seq.tokens + tok.encode(f" then step {i}")
    assert a.close(30)
    (d,) = list((tmp_path / "sessions").iterdir())
    last = sorted(p for p in d.iterdir() if p.suffix == ".kv")[-1]
    raw = bytearray(last.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped bit in the second turn's KV
    last.write_bytes(bytes(raw))
    b = load_engine(smollm_dir, speculation=False, session_store=str(tmp_path))
    seq = b.add_request(history, GREEDY, session_id="c")
    b.run_until_done([seq])
    assert seq.output_ids == ref.generate([history], GREEDY)[0]  # never served from the corrupt KV
    assert seq.stats.restored_tokens == ends[0] and seq.stats.prefilled_tokens == len(history) - ends[0]


def test_mismatched_store_is_refused(smollm_dir, tmp_path):
    a = load_engine(smollm_dir, speculation=False, session_store=str(tmp_path))
    assert a.close(5)
    with pytest.raises(StampMismatch, match="dtype"):
        load_engine(smollm_dir, speculation=False, session_store=str(tmp_path), dtype=torch.bfloat16)


def test_export_import_moves_a_session_exactly(smollm_dir, ref):
    a = load_engine(smollm_dir, speculation=False)
    b = load_engine(smollm_dir, speculation=False)
    tok = a.tokenizer
    history = tok.apply_chat([{"role": "user", "content": "Summarise the incident report."}])
    for i in range(2):
        seq = a.add_request(history, GREEDY, session_id="mv", open_session=True, owner="k")
        a.run_until_done([seq])
        history = seq.tokens + tok.encode(f" and item {i}")
    data = a.sessions.export("mv", "k")
    info = b.sessions.import_state("mv", "k", data)
    assert (info.state, info.tokens, len(info.history)) == ("stored", len(a.get_session("mv").tokens), 2)
    with pytest.raises(Exception, match="already exists"):
        b.sessions.import_state("mv", "k", data)
    seq = b.add_request(history, GREEDY, session_id="mv", owner="k")
    b.run_until_done([seq])
    assert seq.output_ids == ref.generate([history], GREEDY)[0]
    assert seq.stats.restored_tokens == seq.stats.cached_tokens == info.tokens
    from deltaserve.store.format import StoreError

    with pytest.raises(StoreError):
        b.sessions.import_state("bad", "k", data[:-10])
    assert b.get_session("bad") is None  # a refused import makes nothing


def test_import_onto_an_engine_caching_a_shared_prefix(smollm_dir, ref):
    """An imported session whose first tokens (the chat template) the importer already caches still has the rest
    of its KV restored, not prefilled: a cluster drain moves sessions onto replicas that are serving others."""
    a = load_engine(smollm_dir, speculation=False)
    b = load_engine(smollm_dir, speculation=False)
    tok = a.tokenizer
    other = tok.apply_chat([{"role": "user", "content": "Unrelated question about the weather."}])
    b.run_until_done([b.add_request(other, GREEDY)])
    history = tok.apply_chat([{"role": "user", "content": "Summarise the incident report."}])
    seq = a.add_request(history, GREEDY, session_id="mv", open_session=True, owner="k")
    a.run_until_done([seq])
    history = seq.tokens + tok.encode(" and the next item")
    info = b.sessions.import_state("mv", "k", a.sessions.export("mv", "k"))
    shared = common_prefix_len(other, history)
    assert shared > 0
    seq = b.add_request(history, GREEDY, session_id="mv", owner="k")
    b.run_until_done([seq])
    assert seq.output_ids == ref.generate([history], GREEDY)[0]
    assert seq.stats.cached_tokens == info.tokens and seq.stats.restored_tokens == info.tokens - shared
