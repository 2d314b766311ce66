"""Tiny built-in models and random IA3 adapters for ``ia3fuse demo``, built from transformers
configs (no downloads), with a character-level tokenizer. The tests and benchmarks reuse them through ``tests/factories.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["TINY_ARCHS", "tiny_config", "tiny_model", "tiny_tokenizer", "random_ia3_adapter"]

TINY_ARCHS = ("llama", "gpt2", "t5", "bert", "opt")


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A transformers config of a few thousand parameters for ``arch``."""
    import transformers as tf

    # no dropout: train-mode forwards stay deterministic (the tests compare them)
    common: dict[str, Any] = dict(vocab_size=128)  # Any: mypy checks a **dict against every keyword
    cfg: tf.PretrainedConfig
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    elif arch == "t5":
        # T5Config accepts decoder_start_token_id as an extra config field; its typed signature omits it
        cfg = tf.T5Config(
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            dropout_rate=0.0,
            **common,
        )  # type: ignore[call-arg]
    elif arch == "bert":
        cfg = tf.BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common,
        )
    elif arch == "opt":
        cfg = tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny model in eval mode (causal LM, seq2seq LM or BERT encoder)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = {
        "llama": tf.LlamaForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "t5": tf.T5ForConditionalGeneration,
        "bert": tf.BertModel,
        "opt": tf.OPTForCausalLM,
    }[arch]
    return cls(cfg).eval()


def tiny_tokenizer() -> Any:
    """A character-level tokenizer of 98 tokens (printable ASCII, ``<pad>`` 0, ``<eos>`` 1,
    ``<unk>`` 2) that fits the tiny models' vocabulary of 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def random_ia3_adapter(
    model: Any,
    path: Path,
    *,
    seed: int,
    target_modules: Optional[list[str]] = None,
    feedforward_modules: Optional[list[str]] = None,
    spread: float = 0.3,
    base_name: str = "tiny",
) -> Path:
    """Wrap ``model`` with PEFT IA3, set random vectors ``1 + spread * N(0, 1)``, save to ``path``.

    The base ``model`` is left unchanged (PEFT is applied to a deep copy).
    """
    import copy

    from peft import IA3Config, get_peft_model

    kwargs: dict[str, Any] = {"init_ia3_weights": True}
    if target_modules is not None:
        kwargs["target_modules"] = target_modules
        kwargs["feedforward_modules"] = feedforward_modules or []
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(**kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + spread * torch.randn(param.shape, generator=gen))
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    return Path(path)
