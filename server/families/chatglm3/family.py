"""ChatGLM3-6B as a model family: OpenAI requests to prompt ids, generated ids to text and tool calls."""

from __future__ import annotations

import os

from server.families.base import Prompt
from server.families.chatglm3.prompt import ChatGLM3Conversation, build_messages, from_openai
from server.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from server.families.chatglm3.tools import ASSISTANT_SEPARATOR, ChatGLM3OutputParser
from server.types import ChatRequest


class ChatGLM3Family:
    name = "chatglm3"

    def __init__(self, tokenizer: ChatGLM3Tokenizer):
        self.tokenizer = tokenizer
        # THUDM's chat demos stop on eos and on the model handing the turn to the user or to a tool.
        self.eos_token_ids = {tokenizer.eos_token_id, tokenizer.user_token_id, tokenizer.observation_token_id}
        self._render = {tokenizer.assistant_token_id: ASSISTANT_SEPARATOR}

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike[str], *, revision: str | None = None) -> ChatGLM3Family:
        return cls(ChatGLM3Tokenizer.from_pretrained(path_or_repo, revision=revision))

    def build_prompt(self, request: ChatRequest) -> Prompt:
        conversation = from_openai(request.messages, request.tools, request.tool_choice)
        ids = build_messages(self.tokenizer, conversation.messages, metadata=conversation.forced_tool)
        parser = ChatGLM3OutputParser(conversation.tool_names, forced_tool=conversation.forced_tool)
        # "required": the metadata line the model writes must be one of the tools' names, tokenized as in the
        # prompts it was trained on (build_single_message); the model still picks which tool.
        grammar = _grammar(request, conversation)
        prefixes = [self.tokenizer.sp_encode(f"{name}\n") for name in conversation.tool_names] \
            if conversation.must_call and grammar is None else []
        return Prompt(token_ids=ids, parser=parser, forced_prefixes=prefixes, grammar=grammar)

    def encode_raw(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)  # [gMASK, sop] + sentencepiece, as THUDM's tokenizer.encode

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.piece_bytes(token_id)

    def decode(self, token_ids: list[int]) -> str:
        """Generated text for the parser: specials dropped, except <|assistant|>, which starts a new message.

        Decoding only ever appends as ids grow (see ChatGLM3Tokenizer.decode_text), so the engine's scheme of
        decoding `ids[start:]` and holding back a trailing U+FFFD is exact for multi-byte characters. The text
        keeps sentencepiece's dummy-prefix spaces (e.g. " \\n 你好"); the parser removes the metadata line and
        them, so users never see either.
        """
        return self.tokenizer.decode_text(token_ids, self._render)


def _grammar(request: ChatRequest, conversation: ChatGLM3Conversation) -> str | None:
    """A forced call is constrained to its tool's schema (the grammar then spells the metadata line too, so no
    forced prefix is needed); otherwise the answer follows response_format, after the empty metadata line."""
    from server.families.chatglm3.grammar import PLAIN_ANSWER, call_grammar, metadata_and_call
    from server.structured.formats import forced_tools, response_grammar

    forced = forced_tools(request.tools, request.tool_choice)
    if forced:
        if conversation.forced_tool is not None:  # the prompt already ends with its metadata line
            return next(call_grammar(f, i) for i, f in forced if f["name"] == conversation.forced_tool)
        return metadata_and_call(forced)
    return response_grammar(request.response_format, prefix=PLAIN_ANSWER)
