"""What anefx knows about one model family, in one frozen object.

A :class:`Family` says how to recognise a checkpoint of the family (its config's `model_type`,
its tensor names), which transformers classes build it, what its config needs and what tensor
shapes cannot tell, its presets, where its modules sit (embedding, decoder layers, final norm,
head), the KV-cache states a stateful capture holds and the cache object handed to the stock
model, the stages `anefx diff` compares, which weights palettization may compress, and what a
padded prefill slot leaves untouched. Generic code asks the family; nothing else tests a
`model_type`. The families themselves are the modules of ``models/families/``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from anefx.core.signature import State
from anefx.models.tensor_shapes import ShapeReader


@dataclass(frozen=True)
class Transposed:
    """A stored tensor holding a whole parameter with two axes swapped (Qwen3-VL-MoE's published
    experts: gate_up (E, H, 2I) for the model's (E, 2I, H))."""

    dim0: int
    dim1: int


# Where a stored piece goes in its parameter: an index (a per-expert slice of a fused
# parameter; () for the whole) or the whole parameter with two axes swapped.
Part = tuple[int | slice, ...] | Transposed
# One parameter stored in pieces: (where in the parameter, stored tensor name) per piece.
StoredParts = list[tuple[Part, str]]


def part_of(tensor: Any, part: Part) -> Any:
    """The view of TENSOR (a parameter) that the stored piece PART fills."""
    if isinstance(part, Transposed):
        return tensor.transpose(part.dim0, part.dim1)
    return tensor[part] if part else tensor


@dataclass(frozen=True)
class Default:
    """A config field tensor shapes cannot tell, and the value a family gives it."""

    field: str
    value: Any  # a constant, or a function of the fields inferred so far
    why: str


@dataclass(frozen=True)
class PadRule:
    """What a prefill call with padded slots may change: in every state whose kind is in
    ``kinds``, only the S slots along axis ``axis`` from the call's first position (its real
    tokens' slots, then the padding's). The padding's slots lie after every real position: no
    query sees them (the causal mask) before a later call writes its own tokens there, so
    padding corrupts nothing that is read; every other slot is left as it was."""

    kinds: tuple[str, ...]
    axis: str = "T"


@dataclass(frozen=True)
class Nested:
    """A published layout nesting a family's text model in a larger one (vision-language): its
    config's `model_type`, the key of the text config inside it, the fields the outer config
    decides for the text model, and the prefix its text tensors carry instead of the family's."""

    model_type: str  # the outer config's `model_type`
    config_class: str  # transformers' class of the outer config (the defaults of its fields)
    text_key: str  # where the text model's config sits in the outer one
    # fields the outer config decides (its value, else its class default), as the outer
    # model class reads them (tying: the head of the outer model)
    outer_fields: tuple[str, ...]
    stored_prefix: str  # the text model's tensors as stored ("model.language_model.")
    model_prefix: str  # ... and as the family's model names them ("model.")
    # An outer config without `text_key` holds the text model's fields at its top level, as
    # its class reads them (published Qwen2.5-VL config.json files): those of the family's
    # config class are the text config
    flat: bool = False
    # outer fields that are true when the nested text config says so even though the outer
    # one does not (Qwen2_5_VLConfig forwards a pre-v5 text_config's tie_word_embeddings)
    either: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: everything family-specific that capture, loading, inference of a
    config from tensors, diff, palettization and part splitting need."""

    model_type: str  # the config's `model_type`
    order: int  # where the family and its presets sit in listings (published models first)
    config_class: str  # transformers' config class, by name
    model_class: str  # transformers' *ForCausalLM class, by name
    architectures: tuple[str, ...]  # the config's `architectures`
    # fields the config class would silently default, each with its accepted spellings
    required: tuple[tuple[str, ...], ...]
    # Recognition from tensor names: (suffixes under any decoder layer, those of layer 0) -> a
    # score, 0 for "not this family"; the highest score wins (a MoE checkpoint also carries
    # the q_norm of dense Qwen3, so MoE scores above it).
    recognise: Callable[[frozenset[str], frozenset[str]], int]
    # what recognition looks for, said when no family matches (None: nothing of its own)
    sign: str | None
    # a layout close to this family's that anefx refuses, and why (None: not refused)
    refuse: Callable[[frozenset[str], frozenset[str]], str | None]
    # family-specific inference from tensor shapes: attention, MLP / experts fields
    infer: Callable[[ShapeReader], None]
    defaults: tuple[Default, ...]  # what shapes cannot tell, in the order they are applied
    presets: Mapping[str, dict[str, Any]]  # name -> config dict (real published shapes)
    tiny: str  # the name of its tiny preset (tests)
    # parameters of one attention block beside its four projection matrices: (config, head_dim)
    attention_parameters: Callable[[Mapping[str, Any], int], int]
    experts: Callable[[Mapping[str, Any]], int]  # experts per sparse layer (0: dense)
    # a model parameter a checkpoint may store in pieces: (name, shape) -> pieces ([]: whole)
    stored_parts: Callable[[str, tuple[int, ...]], StoredParts]
    # the KV-cache states of a stateful capture: (config, context, dtype name) -> states, in
    # call order
    states: Callable[[Any, int, str], tuple[State, ...]]
    # the cache object capture hands to the stock model: (owner of the state buffers, the
    # position ids (1, S)) -> a transformers-compatible cache
    cache: Callable[[Any, Any], Any]
    padding: PadRule  # what a padded prefill slot leaves untouched
    layers_path: str = "model.layers"  # the ModuleList of decoder layers
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"  # the final norm
    head_path: str = "lm_head"
    # modules inside a decoder layer whose weights stay dense when palettizing (a router)
    dense_in_layer: tuple[str, ...] = ()
    # what capture changes in the stock model while exporting it, undone afterwards: (model) ->
    # a context manager (a function of transformers' that is no ANE material swapped for an
    # equivalent one, as capture does for mixture-of-experts blocks); its `substitutions`
    # names each for the report
    capture_context: Callable[[Any], contextlib.AbstractContextManager] = lambda model: (
        contextlib.nullcontext()
    )
    substitutions: tuple[str, ...] = ()
    # what kind each decoder layer is, for reports (diff): config -> a label per layer ("" when
    # every layer is alike)
    layer_kinds: Callable[[Any], list[str]] = lambda config: [""] * config.num_hidden_layers
    # The family rotates only part of each head (`partial_rotary_factor` below 1, in
    # rope_parameters): the loader accepts a factor in (0, 1] whose rotated width is even
    # (every other family's is refused: their tables span the head)
    partial_rotary: bool = False
    # family-specific checks of a config dict, after the shared ones (types, bounds, per-layer
    # list lengths): (config dict) -> why it is refused, naming the field (None: accepted)
    check_config: Callable[[Mapping[str, Any]], str | None] = lambda raw: None
    # published layouts that nest the family's text model in a larger (vision-language) one,
    # read as the text model alone
    nested: tuple[Nested, ...] = ()
    # stored tensors the text model does not use, by name prefix: (prefix, what they are);
    # left out of loading and inference, and said once with their count
    dropped_tensors: tuple[tuple[str, str], ...] = ()
    # the decoder layers whose token mixer is a linear attention, not an attention block:
    # (config dict) -> (how many, the parameters of their mixers in all); (0, 0) when every
    # layer attends (the parameter count gives every other layer an attention block)
    linear_attention: Callable[[Mapping[str, Any]], tuple[int, int]] = lambda config: (0, 0)
    # rows `anefx inspect` adds to say the family's own structure: (config) -> {row: text}
    describe: Callable[[Any], dict[str, str]] = lambda config: {}
    # the parameters of one sparse layer's shared expert, beside its routed experts (its MLP
    # and its gate; every token uses them): (config dict) -> count, 0 when there is none
    shared_expert: Callable[[Mapping[str, Any]], int] = lambda config: 0
    # the causal LM when transformers has none (a vision-language model's text decoder under
    # its head: models/families/common.py text_decoder_class); None: `model_class` by name
    model_factory: Callable[[], type] | None = None
    # another family whose model computes exactly this one's from the same tensors (Qwen3-VL's
    # text decoder is Qwen3's): tensors alone say this family only in one of its own published
    # layouts (a nested prefix renamed or its tensors dropped); else they are the twin's
    text_twin: str | None = None
    # what the family's config class rewrites in a config dict before reading it (legacy
    # spellings, as Qwen2.5-VL's rope type "mrope" for "default"): (dict) -> the dict read
    legacy_config: Callable[[dict[str, Any]], dict[str, Any]] = lambda raw: raw
    # every parameter beside the embedding, the head, the token mixers and the MLPs: (config
    # dict) -> count; by default two RMSNorms per decoder layer and the final norm
    other_parameters: Callable[[Mapping[str, Any]], int] = lambda config: (
        (2 * config["num_hidden_layers"] + 1) * config["hidden_size"]
    )
    # config fields `other_parameters` reads beyond the shared ones (the loader passes them)
    parameter_fields: tuple[str, ...] = ()
    # the transformers module classes of the family that no pass lowers (docs/<family>.md says
    # why): a lowered report's blocking constructs are these; () for a family that lowers
    unlowered: tuple[str, ...] = ()

    def config_cls(self) -> type:
        """The transformers config class (imported on first use: families load without it)."""
        import transformers

        return getattr(transformers, self.config_class)

    def model_cls(self) -> type:
        """The transformers *ForCausalLM class (or, for a text decoder transformers ships only
        inside a vision-language model, the family's `model_factory` class over it)."""
        if self.model_factory is not None:
            return self.model_factory()
        import transformers

        return getattr(transformers, self.model_class)

    def model_name(self, stored: str) -> str:
        """The name the family's text model gives stored tensor STORED: a nested layout's
        prefix replaced by the model's own (any other name as it is)."""
        for layout in self.nested:
            if stored.startswith(layout.stored_prefix):
                return layout.model_prefix + stored[len(layout.stored_prefix) :]
        return stored

    def dropped_as(self, stored: str) -> str | None:
        """What stored tensor STORED is, with its prefix, when the text model does not use it
        ("of the vision tower (model.visual.*)"; None: it may)."""
        return next(
            (f"{what} ({p}*)" for p, what in self.dropped_tensors if stored.startswith(p)), None
        )

    @cached_property
    def _layer_pattern(self) -> re.Pattern[str]:
        # at most 9 digits: a longer index is no layer (and int() of thousands would fail)
        return re.compile(rf"^{re.escape(self.layers_path)}\.(\d{{1,9}})(?:\.|$)")

    def layer_index(self, module: str | None) -> int | None:
        """The decoder layer a module path lies in (``model.layers.3.self_attn`` -> 3)."""
        match = self._layer_pattern.match(module or "")
        return int(match.group(1)) if match else None

    def stage_modules(self, num_layers: int) -> list[str]:
        """The modules whose outputs `anefx diff` compares: embedding, each decoder layer,
        final norm, head."""
        layers = (f"{self.layers_path}.{i}" for i in range(num_layers))
        return [self.embed_path, *layers, self.norm_path, self.head_path]

    def weight_kind(self, module: str | None, reader: str) -> str | None:
        """The palettization kind of a weight of MODULE read by a READER op ("gather": a
        table, "conv": a weight): "embed", "ffn", "head", or None (stays dense)."""
        if reader == "gather":  # the embedding table, even when tied to the head
            return "embed"
        if reader != "conv" or not module:
            return None
        if module == self.head_path or module.startswith(self.head_path + "."):
            return "head"
        layer = self.layer_index(module)
        if layer is None:
            return None
        inner = module[len(f"{self.layers_path}.{layer}.") :]
        return None if inner in self.dense_in_layer else "ffn"
