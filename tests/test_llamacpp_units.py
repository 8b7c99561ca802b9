"""The llama.cpp backend's parts that need no llama-server: its wire format, held-back ids, command line, the engine
choice and the ChatGLM3 -> GGUF converter's refusals. The end-to-end tests are in tests/test_llamacpp.py."""

from __future__ import annotations

import logging

import orjson
import pytest

from server.backends.llamacpp.launch import LlamaInstall, llama_argv
from server.backends.llamacpp.supervisor import LlamaSupervisor
from server.backends.llamacpp.wire import completion_body, gguf_vocab, recover_held
from server.bootstrap import engine_choice
from server.config import EMBEDDED_CHAT, Settings, resolve_model_path
from server.types import SamplingParams

SMOL = resolve_model_path(EMBEDDED_CHAT)


@pytest.fixture(scope="module")
def smol_vocab():
    return gguf_vocab(SMOL)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from server.model_files import model_folder

    return AutoTokenizer.from_pretrained(model_folder(SMOL, Settings(_env_file=None).cache_dir))


@pytest.mark.parametrize("text", ["你好，世界！🌍🚀", " café naïve 日本語", "plain ascii", "🚀"])
def test_vocab_pieces_are_the_tokenizers_bytes(smol_vocab, smol_tokenizer, text):
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(smol_vocab.pieces[i] for i in ids) == text.encode("utf-8")
    assert smol_vocab.split(text.encode("utf-8"), len(ids)) is not None


def test_held_back_ids_are_recovered_from_the_next_event(smol_vocab, smol_tokenizer):
    """llama-server sends no event for a token whose text ends inside a character; the next event carries their
    bytes and the count jumps: the ids come back exactly (the split the tokenizer made, longest pieces first)."""
    ids = smol_tokenizer.encode(" 日本語🌍", add_special_tokens=False)
    assert len(ids) > 2
    content = smol_tokenizer.decode(ids)
    assert recover_held(smol_vocab, content, ids[-1], len(ids) - 1) == ids[:-1]
    held_bytes = len(content.encode()) - len(smol_vocab.pieces[ids[-1]])
    assert recover_held(smol_vocab, content, ids[-1], held_bytes + 1) == []  # more ids than bytes: no split


def test_sentencepiece_gguf_pieces_and_byte_tokens(tmp_path, chatglm3_fixtures):
    """ChatGLM3 as GGUF: '▁' is a space, <0xE4> one byte, the role tokens render as nothing (control)."""
    import sentencepiece

    from server.convert import _vocab

    class Collect:
        def __getattr__(self, name):
            return lambda *a: setattr(self, name.removeprefix("add_"), a[0] if a else None)

    sp = sentencepiece.SentencePieceProcessor(model_file=str(chatglm3_fixtures / "tokenizer.model"))
    got = Collect()
    _vocab(got, sp, 65024)
    assert len(got.token_list) == 65024 and got.token_list[64795] == b"<|user|>"
    assert got.eot_token_id == 64795 and got.eom_token_id == 64797 and got.eos_token_id == 2
    byte = next(i for i in range(sp.get_piece_size()) if sp.is_byte(i) and sp.id_to_piece(i) == "<0xE4>")
    assert got.token_types[byte] == 6 and got.token_types[64795] == 3


def test_tiny_fixture_is_refused_with_the_reason(tmp_path, chatglm3_fixtures):
    from server.convert import convert

    with pytest.raises(ValueError, match="4 heads x kv_channels 16 != hidden_size 16"):
        convert(str(chatglm3_fixtures / "tiny-chatglm3"), tmp_path / "tiny.gguf")


def test_completion_body_sets_every_sampler():
    body = orjson.loads(completion_body([1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9, top_k=0, seed=5,
                                                                  repetition_penalty=1.2, frequency_penalty=0.5),
                                        n_predict=7, stream=True, context=512))
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 7 and body["stream"] is True
    assert body["min_p"] == 0.0 and body["top_k"] == 0 and body["repeat_last_n"] == 512  # not llama.cpp's defaults
    assert body["samplers"] == ["penalties", "temperature", "top_k", "top_p"] and body["seed"] == 5
    assert body["repeat_penalty"] == 1.2 and body["frequency_penalty"] == 0.5 and "ignore_eos" not in body
    forced = orjson.loads(completion_body([1], SamplingParams(temperature=0), n_predict=1, stream=False, context=8,
                                          allowed=[4, 9]))
    assert forced["logit_bias"] == [[4, 1000.0], [9, 1000.0]] and "seed" not in forced
    constrained = orjson.loads(completion_body([1], SamplingParams(logit_bias={"7": 5.0, "3": 2.0}), n_predict=4,
                                               stream=True, context=8, grammar='root ::= "a"\n', banned=(3, 0)))
    assert constrained["grammar"] == 'root ::= "a"\n'  # a ban (false: -inf) wins over the client's bias
    assert constrained["logit_bias"] == [[7, 5.0], [3, False], [0, False]]


@pytest.mark.parametrize(("temperature", "seed", "reuse"), [(0.7, None, True), (0.0, None, False), (0.7, 3, False),
                                                         (0.0, 3, False)])
def test_only_an_unreproducible_answer_reuses_the_slots_kv(temperature, seed, reuse):
    # reused KV gives logits a little off a whole prefill: greedy and seeded answers must not depend on the slot
    body = orjson.loads(completion_body([1], SamplingParams(temperature=temperature, seed=seed), n_predict=1,
                                        stream=True, context=8))
    assert body["cache_prompt"] is reuse


def test_greedy_keeps_one_candidate():
    # the same argmax as top-k off, without llama.cpp sorting the whole vocabulary for every token
    greedy = orjson.loads(completion_body([1], SamplingParams(temperature=0.0, top_k=0), n_predict=1, stream=True,
                                          context=8))
    sampled = orjson.loads(completion_body([1], SamplingParams(temperature=0.5, top_k=0), n_predict=1, stream=True,
                                           context=8))
    assert (greedy["top_k"], sampled["top_k"]) == (1, 0)


def test_control_tokens_are_known_for_the_grammar_bans(smol_vocab, smol_tokenizer):
    """llama.cpp's grammar reads a control token as its text ("<|im_start|>" fits inside a JSON string): the backend
    bans those that are not stop ids while a grammar runs, as the native matcher never allows them there."""
    assert set(smol_vocab.control) == set(smol_tokenizer.all_special_ids) | {
        i for i, t in smol_tokenizer.added_tokens_decoder.items() if t.special}


def test_command_line_ours_first_then_llamacpp_args():
    settings = Settings(_env_file=None, max_running_requests=3, llamacpp_args="--threads 2 --parallel 5")
    argv = llama_argv(settings, LlamaInstall("/bin/llama-server", "11434 (x)", "LLAMA_SERVER"), gguf="/m.gguf",
                      served_name="m", port=1234, context=8192)
    assert argv[:3] == ["/bin/llama-server", "--model", "/m.gguf"]
    assert argv[argv.index("--parallel") + 1] == "3" and "--kv-unified" in argv and "--cont-batching" in argv
    assert argv[-4:] == ["--threads", "2", "--parallel", "5"]  # the last value of a repeated flag wins there
    assert argv[argv.index("--ctx-size") + 1] == "8192"


def test_child_log_levels():
    sup = LlamaSupervisor(Settings(_env_file=None), gguf="/m.gguf", served_name="m", context=8)
    assert sup.line_level("W llama_context: n_ctx_seq (8192) < n_ctx_train") == logging.WARNING
    assert sup.line_level("E main: failed to load model") == logging.ERROR
    assert sup.line_level("I main: server is listening on http://127.0.0.1:1") == logging.INFO
    assert sup.line_level("I srv  log_server_r: done request: GET /health 127.0.0.1 200") == logging.DEBUG
    assert sup.line_level("I slot launch_slot_: id  0 | task 3 | processing task") == logging.DEBUG


def test_engine_choice(tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("")
    base = dict(_env_file=None)
    assert engine_choice(Settings(**base, llama_server=str(fake)))[0] == "llamacpp"  # the embedded model is a .gguf
    why = engine_choice(Settings(**base, llama_server=str(fake)))[1]
    assert "a .gguf model" in why and "LLAMA_SERVER" in why
    assert engine_choice(Settings(**base, llama_server=str(fake), vllm_python="/x/python"))[0] == "vllm"
    assert engine_choice(Settings(**base, llama_server=str(fake), model_path=str(tmp_path)))[0] == "native"
    # LORA_MODULES too: llama.cpp takes peft adapters on the embedded llama-arch GGUF (tests/test_llamacpp_lora.py)
    assert engine_choice(Settings(**base, llama_server=str(fake), lora_modules="a=/x"))[0] == "llamacpp"
    assert engine_choice(Settings(**base, engine="llamacpp"))[0] == "llamacpp"


def test_a_grammar_llama_server_refuses_is_a_400():
    """gbnf.py keeps them from it; should one get through, llama-server's 400 stays ours (a 500 would blame us)."""
    from server.api.errors import engine_status
    from server.backends.llamacpp.backend import LlamaCppBackend

    backend = LlamaCppBackend(None, gguf="/m.gguf", context_length=8)
    body = orjson.dumps({"error": {"code": 400, "message": "Failed to initialize samplers: failed to parse grammar",
                                   "type": "invalid_request_error"}})
    err = backend.http_error(400, body)
    assert engine_status(err) == 400 and err.code == "invalid_schema" and "failed to parse grammar" in err.message
