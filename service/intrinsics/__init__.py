"""Granite intrinsics I/O: each adapter's `io.yaml` (granite-common's schema), applied server-side by
the native /intrinsic routes, summarised by discovery, and exported for Mellea (adapter_index.json).

    config.py    io.yaml -> IoConfig (validated at start-up: errors name the file and the field)
    apply.py     native request -> rewritten chat (granite-common's IntrinsicsRewriter) -> prompt,
                 sampling defaults, decoding constraint; raw output -> `result` (IntrinsicsResultProcessor)
    index.py     the directory Mellea's OpenAIBackend(adapter_source=DIR) reads
"""
