"""What the Qwen families share: default rows, the tiny preset shape, the KV-cache states, the
inference rules for the attention, dense-MLP and expert tensors, how experts are stored, and
what the text decoders of the vision-language models need (their published layouts, the causal
LM over the text model, the mrope recomposition for text)."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

from anefx.core.signature import State
from anefx.models.family import Default, Family, Nested, PadRule, StoredParts
from anefx.models.kv_cache import CACHE_AXES, RowKVCache, cache_name, kv_cache_shape
from anefx.models.tensor_shapes import ShapeReader

ROPE_DEFAULT = Default(
    "rope_parameters",
    {"rope_type": "default", "rope_theta": 1000000.0},
    "every published Qwen2.5/Qwen3 model except the 2507 updates (5e6); no rope scaling",
)
RMS_EPS_DEFAULT = Default("rms_norm_eps", 1e-6, "published Qwen2.5-Instruct, Qwen3 and Qwen3-MoE")

# A prefill call writes its S slots of every K and V state from its first position; the
# padding's slots come after the real tokens' (models/family.py: PadRule).
KV_PADDING = PadRule(kinds=("key", "value"))


def tiny(model_type: str, **fields: Any) -> dict[str, Any]:
    """The shared tiny shapes: hidden 64, 2 layers, vocab 512, grouped KV heads."""
    return {
        "model_type": model_type,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "dtype": "bfloat16",
        **copy.deepcopy(fields),
    }


def kv_states(config: Any, context: int, dtype: str) -> tuple[State, ...]:
    """A K and a V state per decoder layer, (1, kv_heads, head_dim, context) each, layer by
    layer (K first)."""
    shape = kv_cache_shape(config, context)
    return tuple(
        State(cache_name(kind, layer), role, (layer,), shape, dtype, CACHE_AXES)
        for layer in range(config.num_hidden_layers)
        for kind, role in (("k", "key"), ("v", "value"))
    )


def whole(name: str, shape: tuple[int, ...]) -> StoredParts:
    """Every parameter is stored whole."""
    return []


def no_experts(config: Mapping[str, Any]) -> int:
    return 0


def shared_expert_parameters(config: Mapping[str, Any]) -> int:
    """A sigmoid-gated shared expert beside the routed ones (Qwen2-MoE, Qwen3-Next,
    Qwen3.5-MoE): a gated MLP of width `shared_expert_intermediate_size` and its (1, hidden)
    gate."""
    hidden = config["hidden_size"]
    return 3 * hidden * config["shared_expert_intermediate_size"] + hidden


def never_refused(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    return None


def attention_rows(r: ShapeReader) -> tuple[str, int, str, int]:
    """(q_proj name, its rows, k_proj name, its rows) of layer 0."""
    q_name = r.layer_tensor(0, "self_attn.q_proj.weight")
    k_name = r.layer_tensor(0, "self_attn.k_proj.weight")
    q_rows, _ = r.get(q_name, 2)
    k_rows, _ = r.get(k_name, 2)
    return q_name, q_rows, k_name, k_rows


def q_norm_attention(r: ShapeReader) -> None:
    """Qwen3 attention: head_dim is the q_norm length, heads and KV heads follow from the rows."""
    q_name, q_rows, k_name, k_rows = attention_rows(r)
    (head_dim,) = r.get(r.layer_tensor(0, "self_attn.q_norm.weight"), 1)
    r.fields["head_dim"] = head_dim
    r.fields["num_attention_heads"] = r.divide(q_name, q_rows, head_dim, "head_dim")
    r.fields["num_key_value_heads"] = r.divide(k_name, k_rows, head_dim, "head_dim")
    r.fields["attention_bias"] = "self_attn.q_proj.bias" in r.layers[0]


def q_norm_attention_parameters(config: Mapping[str, Any], head_dim: int) -> int:
    """Qwen3 attention beside its matrices: optional bias on all four projections, q/k norms."""
    heads = config["num_attention_heads"]
    q_out = heads * head_dim
    kv_out = (config.get("num_key_value_heads") or heads) * head_dim
    bias = q_out + 2 * kv_out + config["hidden_size"] if config.get("attention_bias") else 0
    return bias + 2 * head_dim  # q_norm and k_norm


def dense_mlp(r: ShapeReader, required: bool) -> None:
    """intermediate_size from the gate_proj rows every dense MLP layer agrees on."""
    widths = {
        i: r.shape(i, "mlp.gate_proj.weight", 2)[0]
        for i, per_layer in r.layers.items()
        if "mlp.gate_proj.weight" in per_layer
    }
    width = r.one_value(widths, "intermediate_size")
    if width is not None:
        r.fields["intermediate_size"] = width
    elif required:
        raise r.fail(f"tensor '{r.layer_tensor(0, 'mlp.gate_proj.weight')}' missing")


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts blocks: a router `mlp.gate` (E, H), E experts stored per expert or fused,
# and (Qwen3-Next, Qwen3.5-MoE) a shared expert with a sigmoid gate

# per-expert tensors of a layer, as published checkpoints store them
_EXPERT = re.compile(r"^mlp\.experts\.(\d{1,9})\.(gate_proj|up_proj|down_proj)\.weight$")
# the model's fused expert parameters
_FUSED_EXPERTS = re.compile(r"^(.+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def has_router(suffixes: frozenset[str]) -> bool:
    """Expert or router tensors in some layer."""
    return any(s.startswith("mlp.experts.") or s == "mlp.gate.weight" for s in suffixes)


def routed_experts(r: ShapeReader) -> set[int]:
    """num_experts and moe_intermediate_size from the routers and the experts, fused (E, 2I, H)
    / (E, H, I) (or transposed, as Qwen3-VL-MoE publishes them: the width is the axis of
    down_proj that is not hidden_size) or per expert (I, H) / (H, I); returns the layers that
    hold them."""
    hidden = r.fields["hidden_size"]
    expert_count: dict[int, int] = {}
    expert_width: dict[int, int] = {}
    for i, per_layer in r.layers.items():
        if "mlp.gate.weight" in per_layer:  # the router, (E, H)
            expert_count[i] = r.shape(i, "mlp.gate.weight", 2)[0]
        if "mlp.experts.down_proj" in per_layer:  # fused, (E, H, I)
            experts, a, b = r.shape(i, "mlp.experts.down_proj", 3)
            expert_count.setdefault(i, experts)
            expert_width[i] = b if a == hidden else a
        per_expert = [m for s in per_layer if (m := _EXPERT.match(s))]
        if per_expert:  # (I, H) gate/up, (H, I) down per expert
            expert_count.setdefault(i, max(int(m.group(1)) for m in per_expert) + 1)
            first = r.shape(i, per_expert[0].group(0), 2)
            down = per_expert[0].group(2) == "down_proj"
            expert_width.setdefault(i, first[-1] if down else first[0])
    r.fields["num_experts"] = r.one_value(expert_count, "num_experts")
    width = r.one_value(expert_width, "moe_intermediate_size")
    if width is None:
        raise r.fail("a router 'mlp.gate.weight' but no expert weights")
    r.fields["moe_intermediate_size"] = width
    return set(expert_count) | set(expert_width)


def infer_experts(r: ShapeReader) -> set[int]:
    """The routed experts' count and width, which layers are sparse (decoder_sparse_step,
    mlp_only_layers) and intermediate_size from a dense layer if there is one; returns the
    sparse layers."""
    dense_mlp(r, required=False)  # a dense layer, if any, gives intermediate_size
    sparse = routed_experts(r)
    r.fields["decoder_sparse_step"], r.fields["mlp_only_layers"] = sparse_pattern(
        len(r.layers), sparse
    )
    return sparse


def infer_shared_expert(r: ShapeReader, sparse: set[int]) -> None:
    """shared_expert_intermediate_size from the shared expert's gate_proj rows (I_s, H), in
    every layer of SPARSE, beside its gate `mlp.shared_expert_gate` (1, H)."""
    hidden = r.fields["hidden_size"]
    widths: dict[int, int] = {}
    for i in sorted(sparse):
        gate = r.layer_tensor(i, "mlp.shared_expert_gate.weight")
        if tuple(r.get(gate, 2)) != (1, hidden):
            raise r.fail(
                f"tensor '{gate}' has shape {list(r.get(gate, 2))}, expected [1, {hidden}] (one "
                "sigmoid gate per token, by hidden_size)"
            )
        widths[i] = r.get(r.layer_tensor(i, "mlp.shared_expert.gate_proj.weight"), 2)[0]
    r.fields["shared_expert_intermediate_size"] = r.one_value(
        widths, "shared_expert_intermediate_size"
    )


def sparse_pattern(layers: int, sparse: set[int]) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) that make exactly `sparse` the MoE layers.

    transformers' rule: layer i is sparse iff i not in mlp_only_layers and (i + 1) % step == 0.
    A step that gives the set exactly is preferred; otherwise step 1 and the dense layers listed.
    """
    for step in range(1, layers + 1):
        if {i for i in range(layers) if (i + 1) % step == 0} == sparse:
            return step, []
    return 1, sorted(set(range(layers)) - sparse)


def experts(config: Mapping[str, Any]) -> int:
    """Experts per sparse layer of a config dict.

    transformers writes the field as `num_local_experts` (its attribute_map alias), published
    config.json files as `num_experts`; both are read.
    """
    return config.get("num_experts", config.get("num_local_experts", 128))


def expert_parts(name: str, shape: tuple[int, ...]) -> StoredParts:
    """The per-expert checkpoint tensors making up fused expert parameter `name` (else []).

    Published Qwen3-MoE and Qwen3-Next checkpoints, and transformers' own save_pretrained of
    them (which undoes its load-time fusion), store `experts.<e>.{gate,up,down}_proj.weight`;
    the model holds `experts.gate_up_proj` (E, 2I, H), gate rows first, and
    `experts.down_proj` (E, H, I). A checkpoint storing the fused tensors loads them whole.
    """
    match = _FUSED_EXPERTS.match(name)
    if match is None or len(shape) != 3:
        return []
    prefix, kind = match.groups()
    if kind == "down_proj":
        return [((e,), f"{prefix}.{e}.down_proj.weight") for e in range(shape[0])]
    half = shape[1] // 2
    parts: StoredParts = []
    for e in range(shape[0]):
        parts.append(((e, slice(0, half)), f"{prefix}.{e}.gate_proj.weight"))
        parts.append(((e, slice(half, None)), f"{prefix}.{e}.up_proj.weight"))
    return parts


# ---------------------------------------------------------------------------------------------
# Multimodal rotary (mrope) for text


MROPE_SUBSTITUTION = (
    "text-mode mrope: the text rotary's recomposition_frequencies (select/slice scatters of "
    "three equal position streams) replaced by its value for equal streams"
)


def equal_streams_recomposition(self: Any, freq: Any) -> Any:
    """A text rotary's ``recomposition_frequencies`` when its three mrope position streams are
    equal (text: the model expands one (1, S) position row to all three): whichever stream a
    frequency is taken from (Qwen2.5-VL's sections, Qwen3-VL's and Qwen3.5's interleaving),
    it is stream 0's, so the result is the 1-D rotary's ``cat(freq, freq)``."""
    import torch

    return torch.cat((freq[0], freq[0]), dim=-1)


@contextlib.contextmanager
def equal_mrope_streams(model: Any) -> Iterator[None]:
    """While capturing: every mrope rotary class of MODEL (a module with `mrope_section` whose
    class defines `recomposition_frequencies`) recomposes as for equal streams; restored
    afterwards."""
    saved: list[tuple[type, Any]] = []
    for sub in model.modules():
        cls = type(sub)
        own = vars(cls).get("recomposition_frequencies")
        if own is None or not hasattr(sub, "mrope_section") or any(c is cls for c, _ in saved):
            continue
        saved.append((cls, own))
        cls.recomposition_frequencies = equal_streams_recomposition
    try:
        yield
    finally:
        for cls, own in reversed(saved):
            cls.recomposition_frequencies = own


def mrope_sections(rotary: int, published: list[int], published_rotary: int) -> list[int]:
    """Three mrope sections splitting the ROTARY dims of a head (summing to rotary / 2): the
    PUBLISHED ones for the published rotary width, else thirds (for text they are one rotary
    anyway)."""
    if rotary == published_rotary:
        return list(published)
    half = rotary // 2
    third = half // 3
    return [half - 2 * third, third, third]


# ---------------------------------------------------------------------------------------------
# The text decoder of a vision-language model


VISION_TOWER = "of the vision tower"


def vl_layout(model_type: str, config_class: str, flat: bool = False, either=()) -> Nested:
    """transformers' vision-language layout of a text model: the outer config nests it as
    `text_config`; its class ties the head by its own `tie_word_embeddings`; the text model's
    tensors are ``model.language_model.*``."""
    return Nested(
        model_type=model_type,
        config_class=config_class,
        text_key="text_config",
        outer_fields=("tie_word_embeddings",),
        stored_prefix="model.language_model.",
        model_prefix="model.",
        flat=flat,
        either=tuple(either),
    )


@functools.cache
def text_decoder_class(name: str, text_model: str, pretrained: str) -> type:
    """transformers' TEXT_MODEL class (a vision-language model's text decoder, unmodified)
    under an LM head, as the class NAME: the causal LM transformers does not ship for it.

    It computes what the vision-language class computes for text alone: that class's forward
    runs the same text model on the token embeddings (no image: no visual embeddings are
    merged, no deepstack features added) and applies ``lm_head`` (bias-free, tied to the
    embedding by the config's ``tie_word_embeddings``) to the last hidden states. PRETRAINED
    is the family's PreTrainedModel class (weight init, attention settings). Built once per
    name (the class is the family's `model_cls`).
    """
    import transformers
    from torch import nn
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base = getattr(transformers, pretrained)
    text_cls = getattr(transformers, text_model)

    def __init__(self, config):  # noqa: N807 (a method of the class built below)
        base.__init__(self, config)
        self.model = text_cls(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    return type(
        name,
        (base, transformers.GenerationMixin),
        {
            "__module__": __name__,
            "__init__": __init__,
            "forward": forward,
            "get_input_embeddings": get_input_embeddings,
            "set_input_embeddings": set_input_embeddings,
            "config_class": text_cls.config_class,
            "_tied_weights_keys": {"lm_head.weight": "model.embed_tokens.weight"},
        },
    )


def vl_text_family(text_model: str, pretrained: str, **fields: Any) -> Family:
    """The Family of a vision-language model's language tower: FIELDS and what every tower
    shares: the KV-cache states, mrope collapsed to 1-D rotary at capture (its three text
    streams are equal), the vision tower's tensors left out and said, and a causal LM
    generated over transformers' text model TEXT_MODEL (pretrained base PRETRAINED)."""
    model_class = fields["model_class"]
    shared: dict[str, Any] = {
        "architectures": (model_class,),
        "required": (),
        "sign": None,
        "refuse": never_refused,
        "experts": no_experts,
        "stored_parts": whole,
        "states": kv_states,
        "cache": RowKVCache,
        "padding": KV_PADDING,
        "capture_context": equal_mrope_streams,
        "substitutions": (MROPE_SUBSTITUTION,),
        "dropped_tensors": (("model.visual.", VISION_TOWER),),
        "model_factory": lambda: text_decoder_class(model_class, text_model, pretrained),
    }
    return Family(**{**shared, **fields})
