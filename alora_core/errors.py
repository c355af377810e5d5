"""Typed errors of the engine. Each carries the HTTP status it maps to, so the service maps them once.

AloraError
├── InvalidRequestError       400  malformed request (empty input, bad sampling values, bad token ids)
├── NotFoundError             404  unknown adapter / conversation
├── ContextTooLongError       413  context longer than the model maximum or the KV pool
├── InvocationMissingError    422  aLoRA input without its invocation sequence
├── CapacityError             503  KV blocks exhausted by other live requests (retry later)
├── CacheUnavailableError     503  a conversation only Redis knows, on a node unreachable now (retry later)
├── AdapterLoadError          --   adapter directory unusable (raised at load time, not per request)
└── UnsupportedModelError     --   the model needs what the engine does not compute exactly (start-up)
"""


class AloraError(Exception):
    """Base of every error the engine raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(AloraError):
    status_code = 400
    code = "invalid_request"


class NotFoundError(AloraError):
    status_code = 404
    code = "not_found"


class UnknownAdapterError(NotFoundError):
    code = "unknown_adapter"


class UnknownConversationError(NotFoundError):
    code = "unknown_conversation"


class ContextTooLongError(AloraError):
    status_code = 413
    code = "context_too_long"


class InvocationMissingError(AloraError):
    status_code = 422
    code = "invocation_missing"


class ConversationBusyError(AloraError):
    status_code = 409
    code = "conversation_busy"


class OverloadedError(AloraError):
    status_code = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestCancelledError(AloraError):
    status_code = 499
    code = "cancelled"


class CapacityError(AloraError):
    status_code = 503
    code = "kv_cache_exhausted"


class CacheUnavailableError(AloraError):
    """This replica does not know the conversation and the Redis node holding its handle does not
    answer (e.g. a Cluster master failing over): whether it exists is unknown until it does."""

    status_code = 503
    code = "cache_unavailable"
    retry_after_s = 2.0


class AdapterLoadError(AloraError):
    """An adapter directory cannot be served: missing files, unsupported variant, shape mismatch..."""

    status_code = 400
    code = "adapter_load_error"


class AdapterConflictError(AdapterLoadError):
    """An adapter of that name is already loaded with different weights."""

    status_code = 409
    code = "adapter_conflict"


class UnsupportedModelError(AloraError):
    """The model asks for something the engine does not compute exactly (a Mamba layer, a non-causal
    mask, an attention argument it does not implement...): refused at start-up, never served approximately."""

    code = "unsupported_model"

    def __init__(self, model_type: str, feature: str) -> None:
        super().__init__(f"model type {model_type!r} is not supported: {feature}")
        self.model_type = model_type
        self.feature = feature
