"""The rows of the quality table (TR-Merging's Table 1) and the engine request each one makes.

A row is one way of answering: the base model, one expert alone (FT-x), a static merge of all
experts, dynamic routing-merging at top-K, or the oracle (the true task's expert). Every row
goes through the engine's real generation path; only the request differs.

Static merges follow the papers and PEFT's `add_weighted_adapter` conventions:
- weight averaging: linear, weight 1/N each (Wortsman et al.; model soups);
- task arithmetic: linear, lambda = 0.3 each (Ilharco et al., the value TR-Merging uses);
- TIES, DARE-TIES, NeuroMerging: weight 1 each with the methods' default parameters (TIES
  density 0.2, DARE drop rate 0.5, NeuroMerging mask ratio 0.15 and lambda_2 = 1/(1 - sigma)),
  as PEFT's `add_weighted_adapter(..., combination_type="ties", weights=[1.0] * N)`: these
  methods already average (disjoint mean), so a scale below 1 would shrink the merged vector.
  The engine stores these merges as exact dense "virtual adapters" (storage="exact").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.engine.types import GenerationRequest, MergeSpec, SamplingParams
from router_index.router import RoutingOptions

# Row keys in table order; "ft" expands to one row per expert.
DEFAULT_ROWS = (
    "base", "ft", "avg", "ta", "ties", "dare_ties", "neuro", "top1", "top2", "top3", "oracle",
)
_STATIC = {
    # key: (label, merge method, weight for N adapters)
    "avg": ("Weight averaging", "linear", lambda n: 1.0 / n),
    "ta": ("Task arithmetic (λ=0.3)", "linear", lambda n: 0.3),
    "ties": ("TIES", "ties", lambda n: 1.0),
    "dare_ties": ("DARE-TIES", "dare_ties", lambda n: 1.0),
    "neuro": ("NeuroMerging", "neuro", lambda n: 1.0),
}
GROUPS = ("base", "expert", "static", "dynamic", "oracle")


@dataclass(frozen=True)
class Row:
    key: str  # unique, as in --rows ("ft:<id>" for experts, "top2@0.02" for an explicit tau)
    label: str  # shown in the table
    group: str  # one of GROUPS
    model: str = "auto"  # "base", an adapter id, or "auto"; "" for the oracle (per task)
    mix: tuple[tuple[str, float], ...] | None = None  # static merges
    method: str = "linear"
    top_k: int | None = None  # dynamic rows
    temperature: float | None = None  # dynamic rows: None = the engine's default


def expand_rows(keys: list[str], adapter_ids: list[str]) -> list[Row]:
    """The rows for `--rows` keys.

    Args:
        keys: row keys: base, ft (every expert), ft:<id>, avg, ta, ties, dare_ties, neuro,
            top<K> or top<K>@<tau>, oracle.
        adapter_ids: the experts, in table order.

    Returns:
        The rows, in the order given.

    Raises:
        ValueError: on an unknown key.
    """
    rows: list[Row] = []
    for key in keys:
        if key == "base":
            rows.append(Row("base", "Base model", "base", model="base"))
        elif key == "ft":
            rows += [Row(f"ft:{a}", f"FT-{a}", "expert", model=a) for a in adapter_ids]
        elif key.startswith("ft:") and key[3:] in adapter_ids:
            rows.append(Row(key, f"FT-{key[3:]}", "expert", model=key[3:]))
        elif key in _STATIC:
            label, method, weight = _STATIC[key]
            w = weight(len(adapter_ids))
            rows.append(Row(key, label, "static", mix=tuple((a, w) for a in adapter_ids),
                            method=method))
        elif key.startswith("top"):
            rows.append(_dynamic_row(key))
        elif key == "oracle":
            rows.append(Row("oracle", "Oracle routing (true expert)", "oracle", model=""))
        else:
            raise ValueError(
                f"unknown row {key!r}; use base, ft, ft:<id>, {', '.join(_STATIC)}, top<K>, "
                "top<K>@<tau>, oracle"
            )
    seen: set[str] = set()
    duplicates = [r.key for r in rows if r.key in seen or seen.add(r.key)]
    if duplicates:
        raise ValueError(f"rows given twice: {', '.join(duplicates)}")
    return rows


def _dynamic_row(key: str) -> Row:
    spec, _, tau = key[3:].partition("@")
    try:
        k = int(spec)
        temperature = float(tau) if tau else None
    except ValueError:
        raise ValueError(f"bad dynamic row {key!r}: use top<K> or top<K>@<tau>") from None
    if k < 1 or (temperature is not None and temperature <= 0):
        raise ValueError(f"bad dynamic row {key!r}: K >= 1 and tau > 0")
    label = f"Dynamic top-{k}" + (f" (τ={temperature:g})" if temperature is not None else "")
    return Row(key, label, "dynamic", top_k=k, temperature=temperature)


def request_for(
    row: Row, task: str, prompt: str, rendered: str, defaults: RoutingOptions, max_tokens: int
) -> GenerationRequest:
    """The engine request of `row` for one eval prompt of `task` (greedy decoding).

    Args:
        row: the row.
        task: the prompt's task (= its expert's adapter id; the oracle uses it).
        prompt: the user message, which the router embeds.
        rendered: `prompt` through the chat template.
        defaults: the routing options dynamic rows start from (the engine's, or calibrated).
        max_tokens: the generation budget.
    """
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    routing = None
    model = row.model or task  # the oracle answers with the true task's expert
    if row.group == "dynamic":
        routing = replace(
            defaults, top_k=row.top_k, temperature=row.temperature or defaults.temperature,
            explain=0,  # nearest exemplars are not needed here
        )
    return GenerationRequest(
        prompt=rendered, route_text=prompt, model=model, routing=routing,
        merge=_merge_spec(row.method), mix=row.mix, sampling=sampling,
    )


def _merge_spec(method: str) -> MergeSpec:
    # A non-linear merge is stored exactly: the server's default truncated SVD would make the
    # row measure the compression as well as the method.
    return MergeSpec(method=method, storage=None if method == "linear" else "exact")


def request_key(request: GenerationRequest) -> tuple:
    """What decides a greedy answer: identical keys give identical text, so one generation
    serves both (the oracle row repeats FT-x on task x, for instance)."""
    return (request.prompt, request.route_text, request.model, request.routing, request.merge,
            request.mix, request.sampling)
