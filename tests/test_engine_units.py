"""Pure engine logic: stop strings, incremental detokenization, sampling, and the batch KV cache."""

from __future__ import annotations

import time

import pytest
import torch

from server.backends.native.sampling import Sampler
from server.serving.decode import IncrementalDetokenizer, StopStrings
from server.types import SamplingParams


def _run_stops(stops, pieces):
    s = StopStrings(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = s.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    return out, hit


def test_stop_string_across_chunks_is_never_emitted():
    out, hit = _run_stops(["END"], ["abc E", "N", "D tail"])
    assert hit and "".join(out) == "abc " and all("E" not in o for o in out[1:])


def test_partial_stop_prefix_is_released_when_it_turns_out_harmless():
    out, hit = _run_stops(["END"], ["abc EN", "x"])
    assert not hit and "".join(out) == "abc ENx"
    assert out[0] == "abc "  # "EN" was held back until "x" arrived


def test_earliest_of_several_stops_wins():
    out, hit = _run_stops(["bb", "a"], ["xxbba"])
    assert hit and "".join(out) == "xx"


def test_detokenizer_with_real_tokenizer_is_exact_for_cjk_and_emoji(server):
    from transformers import AutoTokenizer

    from tests.test_api_chat import _converted_dir

    tok = AutoTokenizer.from_pretrained(_converted_dir(server))
    text = "Hello 你好，世界！🌍🚀 naïve café — done."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(lambda x: tok.decode(x, skip_special_tokens=True))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some byte-level pieces were held back


def test_greedy_and_penalties():
    logits = torch.tensor([0.0, 5.0, 4.9, 1.0])
    assert Sampler(SamplingParams(temperature=0), [], 4, torch.device("cpu")).sample(logits) == 1
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0), [], 4, torch.device("cpu"))
    s.observe(1)
    assert s.sample(logits) == 2  # 5.0 - 1.0 < 4.9
    r = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), [1], 4, torch.device("cpu"))
    assert r.sample(logits) == 2  # the prompt token 1 is penalized: 5.0 / 2 < 4.9


def test_seeded_sampling_is_reproducible_and_top_p_restricts():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draws(seed, **kw):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed, **kw), [], 1000, torch.device("cpu"))
        return [s.sample(logits) for _ in range(20)]

    assert draws(5) == draws(5) and draws(5) != draws(6)
    top = int(torch.argmax(logits))
    assert set(draws(1, top_p=1e-6)) == {top}
    assert set(draws(1, top_k=1)) == {top}


def test_tiny_temperature_samples_the_top_token_and_overflow_is_a_clear_error():
    from server.backends.native.sampling import NonFiniteLogits

    logits = torch.tensor([0.0, 50.0, 49.0, -3.0])
    cold = Sampler(SamplingParams(temperature=1e-30, seed=0), [], 4, torch.device("cpu"))
    assert cold.sample(logits) == 1  # (50 - 49) / 1e-30 is inf in float32; shifting by the maximum keeps it finite
    overflow = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1e-39), [1], 4, torch.device("cpu"))
    with pytest.raises(NonFiniteLogits, match="repetition_penalty"):
        overflow.sample(logits)  # 50 / 1e-39 = inf: no distribution to draw from


@pytest.mark.parametrize("lengths", [[5, 9, 3], [7], [2, 2, 2, 11]])
def test_batched_kv_decode_equals_single_sequence(lengths):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from server.backends.native.kv_cache import BatchKV

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    prompts = [torch.randint(0, 64, (1, n)) for n in lengths]
    kv = BatchKV(room=2)  # tiny room: forces the grow-by-doubling path
    alone = []
    with torch.no_grad():
        for p in prompts:
            cache = DynamicCache()
            model(input_ids=p, cache=cache, use_cache=True)
            kv.add(cache)
            ref = DynamicCache()
            model(input_ids=p, cache=ref, use_cache=True)
            steps = []
            for t in range(4):
                out = model(input_ids=torch.tensor([[t + 1]]), cache=ref, use_cache=True)
                steps.append(out.logits[0, -1])
            alone.append(steps)
        for t in range(4):
            cache, mask, pos = kv.step_inputs()
            ids = torch.full((len(prompts), 1), t + 1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            for row in range(len(prompts)):
                torch.testing.assert_close(out.logits[row, -1], alone[row][t], atol=1e-5, rtol=1e-5)
            if t == 1 and len(prompts) > 1:  # a sequence leaves mid-way; the others continue unchanged
                kv.keep(list(range(1, len(prompts))))
                prompts, alone = prompts[1:], alone[1:]


def test_incomplete_character_is_held_back_until_complete_or_flushed():
    data = "好".encode()  # three bytes: pretend each is one byte-fallback token
    decode = lambda ids: bytes(data[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    detok = IncrementalDetokenizer(decode)
    assert detok.push(0) == "" and detok.push(1) == ""
    assert detok.flush() == decode([0, 1])  # cut mid-character: the same text a full decode gives
    whole = IncrementalDetokenizer(decode)
    assert [whole.push(i) for i in range(3)] == ["", "", "好"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_prefixes_hold_for_greedy_and_sampled_rows_alike(temperature):
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM

    from server.backends.native.scheduler import Scheduler, Sequence

    vocab = 32
    torch.manual_seed(0)  # a real (random, tiny) model: its own preferences, real KV cache, batched decode
    random_model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))

    finished, answers = threading.Event(), {}

    def publish(batch):
        for seq, out in batch:
            if out.finish_reason:
                answers[id(seq)] = (list(seq.generated), out.finish_reason)
        if len(answers) == 8:
            finished.set()

    prefixes = [[5, 6, 7], [5, 9], [11]]
    scheduler = Scheduler(random_model, device=torch.device("cpu"), vocab_size=vocab, publish=publish)
    scheduler.start()
    try:
        for seed in range(8):
            scheduler.submit(Sequence([1, 2, 3], SamplingParams(temperature=temperature, seed=seed), 6, set(),
                                      sink=lambda out: None, forced_prefixes=prefixes))
        assert finished.wait(30)
    finally:
        scheduler.stop()
    for generated, reason in answers.values():
        assert reason == "length" and any(generated[: len(p)] == p for p in prefixes), generated


def test_chat_template_models_constrain_a_forced_tool_call_to_json():
    from types import SimpleNamespace

    from server.errors import EngineError
    from server.families.chat_template import ChatTemplateFamily
    from server.types import ChatRequest, SamplingParams

    shown = []
    tokenizer = SimpleNamespace(  # a tool-capable template; only the family's own decisions are under test here
        chat_template="{% if tools %}tools{% endif %}", eos_token_id=0,
        apply_chat_template=lambda messages, tools=None, **kw: shown.append(tools) or [1, 2, 3])
    family = ChatTemplateFamily(tokenizer, [0])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "hi"}]
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):  # constrained to one JSON call
        prompt = family.build_prompt(ChatRequest(msgs, SamplingParams(), tools=tools, tool_choice=choice))
        assert prompt.grammar and prompt.token_ids == [1, 2, 3]
    auto = family.build_prompt(ChatRequest(msgs, SamplingParams(), tools=tools, tool_choice="auto"))
    assert auto.token_ids and auto.grammar is None
    assert shown == [tools] * 3
    plain = ChatTemplateFamily(SimpleNamespace(chat_template="{{ messages }}", eos_token_id=0,
                                               apply_chat_template=lambda messages, **kw: [1]), [0])
    with pytest.raises(EngineError, match="cannot express tools"):
        plain.build_prompt(ChatRequest(msgs, SamplingParams(), tools=tools, tool_choice="auto"))


def _tiny_model(kind: str):
    if kind == "chatglm3":
        from tests.support import CHATGLM3_FIXTURES

        if not CHATGLM3_FIXTURES.exists():
            pytest.fail("no ChatGLM3 fixtures beside the repo (../shared)")
        from server.backends.native.device import place
        from server.backends.native.loader import load_chat_model

        loaded = load_chat_model(str(CHATGLM3_FIXTURES / "tiny-chatglm3"), place("cpu", "float32"), cache_dir="/tmp")
        return loaded.model, loaded.model.config.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval(), 64


def _greedy_answers(model, vocab: int, prompts: list[list[int]], max_prefill_tokens: int, seen: list[int]):
    """Run `prompts` through a real Scheduler, the first alone for a while so the others join a running batch."""
    import threading

    from server.backends.native.scheduler import Scheduler, Sequence

    answers, done = {}, threading.Event()

    def publish(batch):
        for seq, out in batch:
            if out.finish_reason:
                answers[seq.request_id] = list(seq.generated)
        if len(answers) == len(prompts):
            done.set()

    def recording(input_ids, **kw):
        seen.append(input_ids.shape[1])
        return model(input_ids=input_ids, **kw)

    scheduler = Scheduler(recording, device=torch.device("cpu"), vocab_size=vocab, publish=publish,
                          max_prefill_tokens=max_prefill_tokens)
    scheduler.start()
    try:
        for i, prompt in enumerate(prompts):
            # The first generates long enough to still be running while the others are prefilled.
            scheduler.submit(Sequence(prompt, SamplingParams(temperature=0), 300 if i == 0 else 12, set(),
                                      sink=lambda out: None, request_id=str(i)))
            if i == 0:
                while not scheduler.running:  # the first is generating before the long ones arrive
                    time.sleep(0.01)
        assert done.wait(120)
    finally:
        scheduler.stop()
    return [answers[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["llama", "chatglm3"])
def test_chunked_prefill_answers_exactly_as_whole_prompts(kind):
    model, vocab = _tiny_model(kind)
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, min(vocab, 5000), (n,), generator=rng).tolist() for n in (5, 40, 23)]
    whole, chunked = [], []
    reference = _greedy_answers(model, vocab, prompts, 0, whole)
    assert _greedy_answers(model, vocab, prompts, 7, chunked) == reference
    assert max(whole) == 40 and max(chunked) == 7  # the long prompts really went in chunks of at most 7 tokens


def test_cancelling_a_request_mid_prefill_aborts_it_and_frees_its_slot():
    import threading

    from server.backends.native.scheduler import Scheduler, Sequence

    model, vocab = _tiny_model("llama")
    finished: dict[str, str] = {}
    b_done = threading.Event()

    def publish(batch):
        for seq, out in batch:
            if out.finish_reason:
                finished[seq.request_id] = out.finish_reason
                if seq.request_id == "b":
                    b_done.set()

    scheduler = Scheduler(model, device=torch.device("cpu"), vocab_size=vocab, publish=publish,
                          max_running=2, max_waiting=0, max_prefill_tokens=1)  # one prompt token per step
    scheduler.start()
    try:
        a = Sequence([1, 2, 3], SamplingParams(temperature=0), 2000, set(), sink=lambda out: None, request_id="a")
        scheduler.submit(a)
        while not scheduler.running:
            time.sleep(0.01)
        b = Sequence(list(range(3, 60)) * 8, SamplingParams(temperature=0), 4, set(), sink=lambda out: None,
                     request_id="b")
        scheduler.submit(b)
        while scheduler.prefilling is not b or b.prefilled < 5:  # b is part-way through its prompt
            time.sleep(0.001)
        scheduler.cancel(b)
        assert b_done.wait(30) and finished["b"] == "abort"
        assert b.prefill_cache is None and scheduler.prefilling is None
        scheduler.submit(Sequence([4], SamplingParams(temperature=0), 1, set(), sink=lambda out: None,
                                  request_id="c"))  # b's slot is free again (capacity 2: a and one more)
        scheduler.cancel(a)
    finally:
        scheduler.stop()


def test_engine_event_streams_split_on_line_feeds_only():
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines (and httpx's aiter_lines) but not to SSE, and
    JSON leaves them unescaped: a token that is one of them must stay inside its event."""
    import asyncio

    import httpx

    from server.backends.child.client import split_lines, sse_lines

    assert split_lines('data: {"t":"a\u2028b\x85"}\r\n\ndata: {"t"'.encode()) == (
        ['data: {"t":"a\u2028b\x85"}', ""], b'data: {"t"')
    events = 'data: {"t":"\u2029"}\n\ndata: {"t":"你好"}\n\ndata: [DONE]'.encode()

    async def chunks():  # cut everywhere, in the middle of multi-byte characters too
        for i in range(0, len(events), 3):
            yield events[i:i + 3]

    async def read():
        return [line async for line in sse_lines(httpx.Response(200, content=chunks()))]

    assert asyncio.run(read()) == ['data: {"t":"\u2029"}', "", 'data: {"t":"你好"}', "", "data: [DONE]"]
