"""The OpenAI-compatible API in vLLM's shapes (what the openai SDK, LangChain, LiteLLM, Mellea and
granite-common speak), on the same engine, runner, inputs and errors as the native routes.

    protocol.py    request bodies (strict types; unknown fields ignored; unimplemented ones refused)
    convert.py     request -> adapter, prompt token ids, SamplingParams
    logprobs.py    token strings and logprobs in the chat, legacy and prompt shapes
    responses.py   response bodies
    assemble.py    engine results -> response bodies
    stream.py      SSE chunks
    routes.py      GET /version, GET /v1/models, POST /v1/chat/completions, POST /v1/completions
"""
