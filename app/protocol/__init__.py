"""Request and response shapes: the OpenAI ones, our extensions, and the REST ones.

Every bound the server enforces on a field is declared here (`Field(ge=..., le=...)`), so that
validation and the OpenAPI document are one thing. Bounds that come from the settings
(`max_tokens_limit`, `max_n`, `max_adapters`) are checked in app/api/deps.py and written into
the app's OpenAPI document by app/api/openapi.py; here are the static hard bounds.

Request models of the OpenAI endpoints accept extra fields, because clients send fields we
have no use for; the ones we cannot honour are refused by name (app/api/deps.py
`refuse_unsupported`). Our own extensions (`routing`, `merge`) are validated strictly so a
typo is a 400 (code invalid_schema), not a silent default.
"""


from app.protocol.base import (  # noqa: F401 (the package's interface)
    INT64,
    INVALID_VALUE,
    MAX_STATIC_N,
    MAX_STATIC_TOKENS,
    SEED_BOUND,
    AdapterWeight,
    ErrorDetail,
    ErrorResponse,
    PromptTokensDetails,
    RoutingInfo,
    Usage,
    Whole,
)
from app.protocol.extensions import (  # noqa: F401 (the package's interface)
    MERGE_REQUEST_MODELS,
    Bias,
    DareLinearMergeParams,
    DareTiesMergeParams,
    JsonObjectFormat,
    LinearMergeParams,
    LogitBias,
    MergeParams,
    NeuroMergeParams,
    ResponseFormat,
    RoutingParams,
    SamplingFields,
    StreamOptions,
    TeMergeParams,
    TextFormat,
    TiesMergeParams,
    TokenId,
    TwinMergeParams,
    _OpenAIGeneration,
)
from app.protocol.openai_shapes import (  # noqa: F401 (the package's interface)
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    NonEmpty,
    TextPart,
    TopLogprob,
)
from app.protocol.rest import (  # noqa: F401 (the package's interface)
    AdapterId,
    AdapterRequest,
    AdapterResponse,
    AdapterTier,
    AdapterTierList,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    MergePreviewRequest,
    MergePreviewResponse,
    NearestExemplar,
    ReadyResponse,
    RefusedAdapterInfo,
    RouteRequest,
    RouteResponse,
)
