"""`deltaserve bench spec --workload first-call`: speculation on a conversation's FIRST tool call.

Single-turn requests: a system prompt, the request's tools (rendered by the model's chat template) and a
user message holding a JSON record whose ids, names, dates and amounts the call must copy. Nothing earlier
in the conversation holds the call, so history lookup alone has little to copy; schema drafts
(`deltaserve/spec/schema_drafts.py`) draft from the tools and the record. The last request's arguments
nest (two objects and an array of objects).

Three modes on the same weights, greedy: speculation off; history lookup only (speculation on, no
`tool_drafts`: what a request got before schema drafts); history + schema drafts. The modes are interleaved
request by request, their order rotating every repetition, so load from other processes on a shared
machine spreads over all three alike. Outputs must be identical across modes (else the run fails). Decode
time of a request = finish - first token (prefill excluded).
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from deltaserve_bench.common import invoked_command, load_note, md_table, report_head
from deltaserve_bench.sections import publish


def _fn(name: str, desc: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": required}}}


S = {"type": "string"}
# (tools, record, instruction): each call copies most of its values from the record.
REQUESTS = [
    ([_fn("create_refund", "Refund an order.", {"order_id": S, "customer_id": S, "amount": {"type": "number"},
                                                "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                                                "reason": {"type": "string", "enum": ["damaged", "late", "other"]}},
          ["order_id", "customer_id", "amount", "currency", "reason"]),
      _fn("lookup_customer", "Find a customer.", {"customer_id": S}, ["customer_id"])],
     {"order": "ORD-2024-118734", "customer": "CUST-88412-B", "placed": "2024-11-03", "total": 129.95,
      "currency": "EUR", "status": "arrived damaged"},
     "The parcel arrived damaged. Refund the full amount of this order."),
    ([_fn("schedule_pickup", "Schedule a courier pickup.", {"order_id": S, "address": S, "date": S,
                                                            "contact_phone": S}, ["order_id", "address", "date"]),
      _fn("cancel_order", "Cancel an order.", {"order_id": S}, ["order_id"])],
     {"order": "ORD-2024-120551", "address": "14 Rue des Lilas, 69003 Lyon", "phone": "+33 4 78 62 19 05",
      "return_window_ends": "2024-12-18"},
     "Schedule a courier pickup for this order on the last day of the return window."),
    ([_fn("book_meeting", "Book a meeting room.", {"room_id": S, "organizer_email": S, "start": S, "end": S,
                                                   "title": S}, ["room_id", "organizer_email", "start", "end"]),
      _fn("list_rooms", "List free rooms.", {"building": S}, ["building"])],
     {"room": "B2-0417-Kepler", "organizer": "ines.moreau@northwind-labs.example", "from": "2024-12-09T14:00",
      "to": "2024-12-09T15:30", "topic": "Quarterly supplier review"},
     "Book this meeting."),
    ([_fn("update_ticket", "Update a support ticket.", {"ticket_id": S, "assignee": S,
                                                        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
                                                        "status": {"type": "string", "enum": ["open", "pending", "closed"]}},
          ["ticket_id", "assignee", "priority", "status"]),
      _fn("add_comment", "Comment on a ticket.", {"ticket_id": S, "text": S}, ["ticket_id", "text"])],
     {"ticket": "SUP-77120-X", "reported_by": "d.okafor@example.org", "owner": "jana.kowalczyk",
      "severity": "high", "state": "open"},
     "Assign this ticket to its owner with high priority and set it to pending."),
    ([_fn("transfer_funds", "Transfer money between accounts.", {"from_iban": S, "to_iban": S,
                                                                 "amount": {"type": "number"}, "reference": S},
          ["from_iban", "to_iban", "amount", "reference"]),
      _fn("get_balance", "Balance of an account.", {"iban": S}, ["iban"])],
     {"payer_iban": "DE89 3704 0044 0532 0130 00", "payee_iban": "FR14 2004 1010 0505 0001 3M02 606",
      "invoice": "INV-2024-00981", "due": 2450.0},
     "Pay this invoice, with the invoice number as the reference."),
    ([_fn("change_flight", "Move a booking to another flight.", {"booking_ref": S, "passenger_name": S,
                                                                 "new_flight": S, "date": S},
          ["booking_ref", "passenger_name", "new_flight", "date"]),
      _fn("get_booking", "Look up a booking.", {"booking_ref": S}, ["booking_ref"])],
     {"booking": "QX7P2M", "passenger": "Anneliese Vandermeer", "current_flight": "LH 1123",
      "alternative": "LH 1127", "travel_date": "2024-12-21"},
     "Move this passenger to the alternative flight on the same date."),
    # Nested arguments: objects (drafted key by key, closed after their last key) and an array of objects.
    ([_fn("create_shipment", "Create a shipment for an order.", {
        "order_id": S,
        "recipient": {"type": "object", "properties": {"name": S, "phone": S}, "required": ["name", "phone"]},
        "address": {"type": "object", "properties": {"street": S, "city": S, "postcode": S, "country": S},
                    "required": ["street", "city", "postcode", "country"]},
        "parcels": {"type": "array", "items": {"type": "object", "properties": {
            "sku": S, "quantity": {"type": "integer"}}, "required": ["sku", "quantity"]}},
        "service": {"type": "string", "enum": ["standard", "express"]}},
          ["order_id", "recipient", "address", "parcels", "service"]),
      _fn("track_shipment", "Track a shipment.", {"tracking_id": S}, ["tracking_id"])],
     {"order": "ORD-2024-131207", "name": "Margarethe Lindqvist", "phone": "+46 8 555 019 24",
      "street": "Storgatan 12", "city": "Uppsala", "postcode": "753 20", "country": "SE", "sku": "KB-7731-NORD",
      "quantity": 2},
     "Create an express shipment for this order: the recipient and address from the record, one parcel with the "
     "ordered item."),
]


def prompts(tok) -> list[tuple[list[int], list[dict]]]:
    out = []
    for tools, record, ask in REQUESTS:
        msgs = [{"role": "system", "content": "You are an operations agent. Act only through tool calls."},
                {"role": "user", "content": f"Record: {json.dumps(record)}\n{ask}"}]
        out.append((tok.apply_chat(msgs, tools), tools))
    return out


def _run_one(eng, prompt: list[int], tools, max_tokens: int, schema: bool) -> dict:
    from deltaserve.engine.sampling import SamplingParams
    from deltaserve.spec.schema_drafts import ToolDrafts

    sp = eng.speculator
    before = (sp.schema_drafted, sp.schema_accepted) if sp is not None else (0, 0)
    seq = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens,
                                                 tool_drafts=ToolDrafts.from_tools(tools) if schema else None))
    eng.run_until_done([seq])
    s = seq.stats
    after = (sp.schema_drafted, sp.schema_accepted) if sp is not None else (0, 0)
    return {"output": seq.output_ids, "decode_s": s.finish_time - s.first_token_time, "decode_tokens": seq.num_output - 1,
            "drafted": s.drafted_tokens, "accepted": s.accepted_tokens, "steps": s.verify_steps,
            "schema_drafted": after[0] - before[0], "schema_accepted": after[1] - before[1]}


def run_first_call(args) -> int:
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict, model_dir
    from deltaserve.models.tokenizer import Tokenizer

    dtype = getattr(torch, args.dtype)
    d = model_dir(args.model)
    model = LlamaModel.from_state_dict(load_config(d), load_state_dict(d), dtype)
    tok = Tokenizer(d)
    # One model, two engines (own KV pools): stateless, so every request prefills alike in every mode.
    cfg = dict(dtype=dtype, cache_mode=CacheMode.STATELESS, kv_cache_bytes=1 << 30)
    engines = {"off": LLMEngine(model, tok, EngineConfig(speculation=False, **cfg)),
               "on": LLMEngine(model, tok, EngineConfig(speculation=True, **cfg))}
    modes = {"speculation off": ("off", False), "history lookup": ("on", False),
             "history + schema drafts": ("on", True)}
    from deltaserve.engine.sampling import SamplingParams
    for eng in engines.values():
        eng.generate([list(range(1000, 1032))], SamplingParams(max_tokens=4))  # warm-up
    work = prompts(tok)
    res: dict[str, list[dict]] = {m: [] for m in modes}
    names = list(modes)
    for rep in range(args.reps):
        for i, (prompt, tools) in enumerate(work):
            shift = (rep + i) % len(names)
            for m in names[shift:] + names[:shift]:  # interleaved A/B/C, rotating order
                e, schema = modes[m]
                res[m].append(_run_one(engines[e], prompt, tools, args.max_tokens, schema) | {"req": i})
    key = lambda r: r["req"]  # noqa: E731
    outs = {m: [r["output"] for r in sorted(rs, key=key)] for m, rs in res.items()}
    same = all(o == outs["speculation off"] for o in outs.values())
    if not same:
        print("ERROR: speculative outputs differ from the non-speculative ones", file=sys.stderr)
    calls = [tok.decode(o) for o in outs["speculation off"][:: args.reps]]
    del engines, model
    gc.collect()
    assert same, "greedy outputs with speculation must equal those without"

    def tps(rs):
        return sum(r["decode_tokens"] for r in rs) / sum(r["decode_s"] for r in rs)

    base = tps(res["speculation off"])
    rows = []
    for m, rs in res.items():
        dr, ac = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
        sd, sa = sum(r["schema_drafted"] for r in rs), sum(r["schema_accepted"] for r in rs)
        steps, toks = sum(r["steps"] for r in rs), sum(r["decode_tokens"] for r in rs)
        rows.append([m, tps(rs), f"{tps(rs) / base:.2f}x", f"{ac / dr:.0%} ({ac}/{dr})" if dr else "-",
                     f"{sa / sd:.0%} ({sa}/{sd})" if sd else "-", f"{toks / max(1, toks - ac):.2f}" if steps else "1.00"])
    table = md_table(["mode", "decode tok/s", "vs off", "acceptance (all drafts)", "acceptance (schema drafts)",
                      "tokens / decode step"], rows)
    per_req = md_table(["request", "decode tokens", "off s", "lookup s", "schema s"], [
        [i, next(r["decode_tokens"] for r in res["speculation off"] if r["req"] == i)] +
        [f"{sum(r['decode_s'] for r in res[m] if r['req'] == i):.2f}" for m in names]
        for i in range(len(work))])
    dec = sum(r["decode_tokens"] for r in res["speculation off"])
    plen = [len(p) for p, _ in work]
    cmd = invoked_command("spec", f"deltaserve bench spec --workload first-call --model {args.model} --dtype {args.dtype}")
    body = (report_head(f"Speculation on the first tool call ({args.model}, {args.dtype})", cmd) +
            f"{len(work)} single-turn requests x {args.reps} repetitions (prompts {min(plen)}-{max(plen)} tokens: "
            f"tools + a JSON record the call copies from), greedy, max_tokens {args.max_tokens}, stateless cache; "
            f"modes interleaved request by request in rotating order. **Outputs identical across modes: "
            f"{'yes' if same else 'NO'}** ({dec} decode tokens per mode).\n\n" + table + "\n\n"
            "Decode time per request, summed over repetitions:\n\n" + per_req + "\n\n"
            "The calls (speculation off):\n\n" + "\n".join(f"- `{c!r}`" for c in calls) + "\n\n" + load_note() + "\n")
    publish(args.write, f"spec-first-call-{args.model}-{args.dtype}", body)
    return 0
