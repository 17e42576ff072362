"""Tiny seeded GPT-2 / Llama / BERT checkpoints built in-process, so tests never need the hub.

Each model has three layers and width 32; its tokenizer is a byte-level BPE trained on
CORPUS below. GPT-2 and Llama tokenizers deliberately have no pad token (nnrun must
supply one); the Llama tokenizer prepends ``<s>`` like real Llama tokenizers do.
"""

from __future__ import annotations

from pathlib import Path

TINY_KINDS: tuple[str, ...] = ("gpt2", "llama", "bert")
VOCAB_SIZE = 512

CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy
is Rome. The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of
England is London. Paris is a city in France, and Berlin is a city in Germany.
The Eiffel Tower is in the city of Paris. The Colosseum is in the city of Rome. The
Brandenburg Gate is in the city of Berlin. The Tower of London is in the city of London.
When Mary and John went to the store, John gave a drink to Mary. When Tom and Anna went
to the park, Anna gave a book to Tom. The cat sat on the mat and the dog sat on the rug.
One, two, three, four, five, six, seven, eight, nine, ten. Numbers: 0 1 2 3 4 5 6 7 8 9
10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 99 100 128 256 512 1000 2024.
Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. The answer is 42. Two plus two is four.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with
a single step. The sun rises in the east and sets in the west. Water boils at 100
degrees. I like to read books about history, science and art. She said that the
weather was good today, so we walked to the river and back again.
The model reads the text, one token at a time, and predicts the next word. Layers,
heads, neurons and residual streams: interpretability studies what happens inside.
"""

_SPECIALS: dict[str, dict[str, str]] = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>"},
    "bert": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
}


def build_tiny_tokenizer(kind: str):  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer for ``kind`` trained on CORPUS (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[kind]
    special_tokens = list(dict.fromkeys(specials.values()))  # unique, in a fixed order
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if kind == "llama":
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    elif kind == "bert":
        cls, sep = specials["cls_token"], specials["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **specials)


def build_tiny_model(
    kind: str, out_dir: Path, seed: int = 0, *, layers: int = 3, width: int = 32
) -> Path:
    """Build and save a tiny seeded ``kind`` model (gpt2, llama or bert) into ``out_dir``.

    The same kind, seed and size always give identical files (the benchmarks use a
    2-layer, width-64 GPT-2).
    """
    import torch
    import transformers

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; use one of {TINY_KINDS}")
    tokenizer = build_tiny_tokenizer(kind)
    vocab = len(tokenizer)
    ids = {
        f"{name}_id": tokenizer.convert_tokens_to_ids(token)
        for name, token in ((n.removesuffix("_token"), t) for n, t in _SPECIALS[kind].items())
    }
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_layer=layers,
            n_embd=width,
            n_head=4,
            n_positions=128,
            bos_token_id=ids["bos_id"],
            eos_token_id=ids["eos_id"],
        )
        model_cls = transformers.GPT2LMHeadModel
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * width,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=ids["bos_id"],
            eos_token_id=ids["eos_id"],
        )
        model_cls = transformers.LlamaForCausalLM
    else:
        config = transformers.BertConfig(
            vocab_size=vocab,
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=4,
            intermediate_size=2 * width,
            max_position_embeddings=128,
            pad_token_id=ids["pad_id"],
        )
        model_cls = transformers.BertModel
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
