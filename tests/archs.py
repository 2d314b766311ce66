"""Tiny models for every model type that PEFT's IA3 knows default target modules for.

One recipe per model type: the transformers config class, its smallest sizes, and the model
class to build (a causal LM, a seq2seq LM, or the bare encoder for BERT-like models). The test
matrix (``tests/test_architectures.py``) and the generated support table (``docs/support.md``)
run over `ARCHITECTURES`; nothing is downloaded.

Widths are 64 (not smaller) because bitsandbytes' 4-bit blocks are 64 values long: a row must
hold whole blocks for the exact statistic fold, and the CPU kernels want multiples of 32.

Example:
    >>> from archs import ARCHITECTURES, tiny_arch_model  # tests/ on sys.path, as under pytest
    >>> model = tiny_arch_model("qwen2", seed=0)  # doctest: +SKIP
    >>> model.config.model_type  # doctest: +SKIP
    'qwen2'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import torch

from ia3fuse.errors import IA3FuseError

__all__ = [
    "ARCHITECTURES",
    "ArchRecipe",
    "UnsupportedModelTypeError",
    "tiny_arch_model",
    "tiny_config",
    "peft_ia3_defaults",
]

Kind = Literal["causal", "seq2seq", "encoder"]


class UnsupportedModelTypeError(IA3FuseError):
    """A model type that the installed transformers cannot build, or that ia3fuse has no recipe for."""


@dataclass(frozen=True)
class ArchRecipe:
    """How to build one tiny model of a model type.

    Attributes:
        model_type: PEFT's key (the built model's ``config.model_type`` unless ``note`` says otherwise).
        config: the transformers config class name.
        model: the transformers model class name.
        kind: ``"causal"``, ``"seq2seq"`` or ``"encoder"`` (what the forward returns).
        sizes: keyword arguments of the config (the smallest sizes that still exercise the family).
        note: how the build departs from PEFT's model type, and why (empty when it does not).
        unsupported: why transformers cannot build this model type (then ``config``/``model`` are empty).
    """

    model_type: str
    config: str
    model: str
    kind: Kind
    sizes: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    unsupported: Optional[str] = None


# no dropout anywhere (train-mode forwards stay deterministic); init 0.1 so that the layers (and
# so IA3 vectors) move the logits by far more than the tolerances the tests use
_DECODER: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "attention_dropout": 0.0,
}
_ENCODER: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.1,
}
_GPT: dict[str, Any] = {
    "vocab_size": 128,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "initializer_range": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_T5: dict[str, Any] = {
    "vocab_size": 128,
    "d_model": 64,
    "d_ff": 128,
    "d_kv": 16,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.0,
}
_NO_DROP: dict[str, Any] = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
_LLAMA4 = (
    "built as the text model Llama4ForCausalLM (model type 'llama4_text') with PEFT's 'llama4' targets passed "
    "explicitly: transformers 5.24's Llama4ForConditionalGeneration (model type 'llama4') fails every forward "
    "(its output reads a missing image_outputs attribute)"
)
_REFINED_WEB = (
    "transformers {version} has no config class for model type {model_type!r} (the pre-release Falcon "
    "checkpoints, which need trust_remote_code); convert the checkpoint to model type 'falcon' "
    "(FalconForCausalLM), which PEFT maps to the same IA3 target modules"
)


def _r(model_type: str, config: str, model: str, kind: Kind, note: str = "", **sizes: Any) -> ArchRecipe:
    return ArchRecipe(model_type, config, model, kind, sizes, note)


ARCHITECTURES: dict[str, ArchRecipe] = {
    r.model_type: r
    for r in (
        _r("t5", "T5Config", "T5ForConditionalGeneration", "seq2seq", **_T5),
        _r("mt5", "MT5Config", "MT5ForConditionalGeneration", "seq2seq", **_T5),
        _r("gpt2", "GPT2Config", "GPT2LMHeadModel", "causal", **_GPT),
        _r(
            "bloom",
            "BloomConfig",
            "BloomForCausalLM",
            "causal",
            vocab_size=128,
            hidden_size=64,
            n_layer=2,
            n_head=4,
            initializer_range=0.1,
            **_NO_DROP,
        ),
        _r("roberta", "RobertaConfig", "RobertaModel", "encoder", **{**_ENCODER, "max_position_embeddings": 66}),
        _r(
            "opt",
            "OPTConfig",
            "OPTForCausalLM",
            "causal",
            vocab_size=128,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            init_std=0.1,
        ),
        _r("gptj", "GPTJConfig", "GPTJForCausalLM", "causal", **_GPT, rotary_dim=8, n_inner=128),
        _r(
            "gpt_neox",
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            "causal",
            **{k: v for k, v in _DECODER.items() if k not in ("num_key_value_heads", "head_dim")},
            hidden_dropout=0.0,
        ),
        _r(
            "gpt_neo",
            "GPTNeoConfig",
            "GPTNeoForCausalLM",
            "causal",
            vocab_size=128,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            attention_types=[[["global", "local"], 1]],
            window_size=16,
            max_position_embeddings=64,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            initializer_range=0.1,
        ),
        _r(
            "bart",
            "BartConfig",
            "BartForConditionalGeneration",
            "seq2seq",
            vocab_size=128,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            init_std=0.1,
        ),
        _r("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "causal", **_GPT, n_inner=128),
        _r("llama", "LlamaConfig", "LlamaForCausalLM", "causal", **_DECODER),
        # layer 1 is a mixture-of-experts layer: routed experts are 3D parameters, the shared expert an MLP
        _r(
            "llama4",
            "Llama4TextConfig",
            "Llama4ForCausalLM",
            "causal",
            note=_LLAMA4,
            **{
                **_DECODER,
                "intermediate_size_mlp": 128,
                "num_local_experts": 2,
                "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 2,
            },
        ),
        _r("mistral", "MistralConfig", "MistralForCausalLM", "causal", **_DECODER),
        _r(
            "mixtral",
            "MixtralConfig",
            "MixtralForCausalLM",
            "causal",
            **_DECODER,
            num_local_experts=2,
            num_experts_per_tok=1,
        ),
        _r("bert", "BertConfig", "BertModel", "encoder", **_ENCODER),
        _r("deberta-v2", "DebertaV2Config", "DebertaV2Model", "encoder", **_ENCODER),
        _r("deberta", "DebertaConfig", "DebertaModel", "encoder", **_ENCODER),
        ArchRecipe("RefinedWebModel", "", "", "causal", unsupported=_REFINED_WEB),
        ArchRecipe("RefinedWeb", "", "", "causal", unsupported=_REFINED_WEB),
        # Falcon-40B's layout (grouped kv heads, fused per-group [q.. k v]); the config default
        # multi_query=True with num_kv_heads=num_attention_heads is a mix no real checkpoint has.
        _r(
            "falcon",
            "FalconConfig",
            "FalconForCausalLM",
            "causal",
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            ffn_hidden_size=128,
            max_position_embeddings=64,
            initializer_range=0.1,
            **_NO_DROP,
        ),
        _r(
            "phi",
            "PhiConfig",
            "PhiForCausalLM",
            "causal",
            **{k: v for k, v in _DECODER.items() if k != "head_dim"},
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
        _r("gemma", "GemmaConfig", "GemmaForCausalLM", "causal", **_DECODER),
        _r("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "causal", **_DECODER),
        _r("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", "causal", **_DECODER),
        _r("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "causal", **_DECODER),
        _r("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "causal", **_DECODER),
    )
}


def peft_ia3_defaults(model_type: str) -> tuple[list[str], list[str]]:
    """PEFT's default IA3 ``(target_modules, feedforward_modules)`` for ``model_type``.

    Raises:
        UnsupportedModelTypeError: PEFT has no defaults for it (the message lists those it has).
    """
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        raise UnsupportedModelTypeError(
            f"PEFT has no default IA3 target modules for model type {model_type!r}; pass target_modules and "
            f"feedforward_modules yourself (PEFT knows: {', '.join(TARGETS)})"
        )
    return list(TARGETS[model_type]), list(FEEDFORWARD.get(model_type, []))


def _recipe(model_type: str) -> ArchRecipe:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelTypeError(
            f"no tiny recipe for model type {model_type!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The tiny transformers config of ``model_type`` (``overrides`` replace recipe sizes).

    Raises:
        UnsupportedModelTypeError: no recipe, or the installed transformers cannot build it.
    """
    import transformers

    recipe = _recipe(model_type)
    if recipe.unsupported is not None:
        raise UnsupportedModelTypeError(
            recipe.unsupported.format(version=transformers.__version__, model_type=model_type)
        )
    config_cls = getattr(transformers, recipe.config, None)
    if config_cls is None:
        raise UnsupportedModelTypeError(
            f"transformers {transformers.__version__} has no {recipe.config} for model type {model_type!r}; "
            "upgrade transformers"
        )
    return config_cls(**{**recipe.sizes, **overrides})


def tiny_arch_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny model of ``model_type`` in eval mode (float32).

    Args:
        model_type: a key of `ARCHITECTURES` (PEFT's IA3 model types).
        seed: the torch seed of the initialisation.
        **overrides: config values that replace the recipe's.

    Raises:
        UnsupportedModelTypeError: no recipe, or the installed transformers cannot build it (the
            message names the model type and why).
    """
    import transformers

    recipe = _recipe(model_type)
    config = tiny_config(model_type, **overrides)
    model_cls = getattr(transformers, recipe.model, None)
    if model_cls is None:
        raise UnsupportedModelTypeError(
            f"transformers {transformers.__version__} has no {recipe.model} for model type {model_type!r}; "
            "upgrade transformers"
        )
    torch.manual_seed(seed)
    return model_cls(config).eval()
