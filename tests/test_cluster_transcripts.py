"""`cluster/transcripts.py`: what the ingress keeps of Responses chains and how it rebuilds a lost one (no Ray)."""

from deltaserve.cluster.transcripts import TranscriptStore, final_response


def _resp(rid, text, store=True):
    return {"id": rid, "store": store, "output": [{"type": "message", "role": "assistant", "status": "completed",
                                                   "content": [{"type": "output_text", "text": text}]}]}


def test_rebuild_carries_the_chain_and_its_tools():
    t = TranscriptStore()
    tools = [{"type": "function", "name": "f", "parameters": {}}]
    t.record("k", {"input": "a", "instructions": "first only", "tools": tools}, _resp("r1", "A"))
    t.record("k", {"input": [{"role": "user", "content": "b"}], "previous_response_id": "r1"}, _resp("r2", "B"))
    new = t.rebuild("k", {"model": "m", "input": "c", "previous_response_id": "r2", "instructions": "own"})
    assert "previous_response_id" not in new and new["instructions"] == "own" and new["tools"] == tools
    assert [it.get("content") if it.get("role") == "user" else it["content"][0]["text"] for it in new["input"]] \
        == ["a", "A", "b", "B", "c"]
    own = [{"type": "function", "name": "g", "parameters": {}}]
    assert t.rebuild("k", {"input": "c", "previous_response_id": "r2", "tools": own})["tools"] == own


def test_tenants_unstored_and_unknown_chains():
    t = TranscriptStore()
    t.record("k", {"input": "a"}, _resp("r1", "A"))
    assert t.rebuild("other", {"input": "c", "previous_response_id": "r1"}) is None  # another key's id
    t.record("k", {"input": "a"}, _resp("r2", "A", store=False))
    assert t.get("k", "r2") is None  # a continuation would 404 on any server
    t.record("k", {"input": "b", "previous_response_id": "unseen"}, _resp("r3", "B"))
    assert t.get("k", "r3") is None  # the chain's start was not seen here


def test_bounded_lru():
    t = TranscriptStore(max_entries=2)
    for i in range(3):
        t.record("k", {"input": str(i)}, _resp(f"r{i}", "x"))
    assert len(t) == 2 and t.get("k", "r0") is None and t.get("k", "r2") is not None


def test_final_response_of_a_stream():
    ev = b'event: response.completed\ndata: {"type": "response.completed", "response": {"id": "r"}}'
    assert final_response(ev) == {"id": "r"}
    assert final_response(b'data: {"type": "response.output_text.delta", "delta": "x"}') is None
