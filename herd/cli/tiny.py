"""Tiny real models and datasets, for tests, the demo and benchmarks.

Nothing can be downloaded from the model hub on CI machines, so herd makes its own: a real mlx-lm
architecture (llama or qwen2) with random weights, saved exactly like a hub folder (config.json,
model.safetensors, a byte-level BPE tokenizer trained with `tokenizers`, a chat template), and a
dataset with a pattern small enough that a LoRA learns it in a few dozen steps.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# The pattern to learn: every animal has one fixed colour. A LoRA memorises the mapping, so the
# validation loss (same facts, other phrasings' order) falls quickly and generation changes.
ANIMALS = [
    "cat", "dog", "fox", "owl", "bee", "cow", "pig", "eel", "ant", "bat", "elk", "emu", "yak",
    "hen", "ram", "cod", "gnu", "jay", "koi", "ape",
]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey", "teal", "plum", "jade", "rust"]


def facts(seed: int = 1234) -> dict[str, str]:
    rng = random.Random(seed)
    return {a: rng.choice(COLOURS) for a in ANIMALS}


def corpus() -> list[str]:
    words = ANIMALS + COLOURS + ["the", "is", "what", "colour", "of", "a", "an", "answer",
                                 "question"]
    lines = [f"the {a} is {c}." for a, c in facts().items()]
    lines += [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += ["".join(chr(c) for c in range(32, 127))]
    return lines * 4


def train_tokenizer(out: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def model_config(arch: str, layers: int, hidden: int, vocab: int) -> dict:
    heads = max(1, hidden // 32)
    common = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": arch == "qwen2",
        "torch_dtype": "float32",
        "eos_token_id": 0,
        "bos_token_id": 0,
    }
    if arch == "llama":
        common["architectures"] = ["LlamaForCausalLM"]
    elif arch == "qwen2":
        common["architectures"] = ["Qwen2ForCausalLM"]
    else:
        raise ValueError(f"unknown arch {arch!r}; llama or qwen2")
    return common


def make_tiny_model(
    out: str | Path,
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    vocab_size: int = 512,
    intermediate: int | None = None,
    dtype: str = "float32",
    shards: int = 1,
) -> Path:
    """Write a model folder that ``mlx_lm.utils.load`` (and so ``herd train``) loads, its weights
    stored in ``dtype`` (bfloat16: as most hub checkpoints are); ``shards`` > 1 writes them as a
    hub checkpoint of that many files with a ``model.safetensors.index.json``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, vocab_size)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    vocab = max(vocab, vocab_size)
    config = model_config(arch, layers, hidden, vocab)
    if intermediate:
        config["intermediate_size"] = intermediate
    config["torch_dtype"] = dtype
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.eval(weights)
    if shards > 1:
        save_shards(out, weights, shards)
    else:
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _unit(key: str) -> int:
    """Where a weight sits in the model's order: the embedding, block i, then norm and head."""
    parts = key.split(".")
    if key.startswith("model.layers."):
        return 1 + int(parts[2])
    return 0 if key.startswith("model.embed_tokens.") else 10**9


def save_shards(out: Path, weights: dict, shards: int) -> None:
    """The weights in ``shards`` files of about equal size, as hub checkpoints are cut: in model
    order, a block never split across two files (so a pipeline stage needs only some files);
    ``model.safetensors.index.json`` maps every weight to its file."""
    import mlx.core as mx

    units: dict[int, dict] = {}
    for k in sorted(weights, key=lambda k: (_unit(k), k)):
        units.setdefault(_unit(k), {})[k] = weights[k]
    groups = list(units.values())
    if not 1 < shards <= len(groups):
        raise ValueError(f"{shards} shards: give 2 to {len(groups)} for this model")
    total = sum(v.nbytes for v in weights.values())
    files: list[dict] = [{}]
    done = 0
    for i, group in enumerate(groups):
        size = sum(v.nbytes for v in group.values())
        # A new file when this group would end nearer past this file's share than short of it,
        # or when each file still due needs one of the groups left.
        due = shards - len(files)
        if files[-1] and due and (done + size / 2 > total * len(files) / shards
                                  or len(groups) - i <= due):
            files.append({})
        files[-1].update(group)
        done += size
    weight_map = {}
    for n, part in enumerate(files, start=1):
        name = f"model-{n:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_data(
    out: str | Path, fmt: str = "text", train: int = 200, valid: int = 40, test: int = 40,
    seed: int = 0,
) -> Path:
    """Write train/valid/test.jsonl in one of mlx-lm's formats, teaching ``facts()``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    table = facts()
    templates = [
        ("what colour is the {a}?", "the {a} is {c}."),
        ("question: colour of the {a}", "answer: {c}."),
        ("tell me the {a}'s colour", "it is {c}."),
    ]

    def record() -> dict:
        a = rng.choice(ANIMALS)
        q, ans = rng.choice(templates)
        q, ans = q.format(a=a), ans.format(a=a, c=table[a])
        if fmt == "text":
            return {"text": f"{q} {ans}"}
        if fmt == "completions":
            return {"prompt": q, "completion": " " + ans}
        if fmt == "chat":
            return {"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": ans}]}
        raise ValueError(f"unknown format {fmt!r}; text, completions or chat")

    for split, n in (("train", train), ("valid", valid), ("test", test)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(record()) + "\n")
    return out


DESCRIPTIONS = {
    "tiny-model": "Write a small real model folder (an mlx-lm llama or qwen2 with random weights, "
                  "a trained byte-level BPE tokenizer, a chat template), loadable by mlx_lm and "
                  "herd train: for trying herd with nothing downloaded. Its text is not "
                  "meaningful; a LoRA on it still learns tiny-data's pattern.",
    "tiny-data": "Write train.jsonl, valid.jsonl and test.jsonl in one of mlx-lm's formats, "
                 "teaching a pattern a LoRA learns in a few dozen steps (each animal has one "
                 "colour).",
}


def main(argv: list[str]) -> int:
    from herd.usage import HelpFormatter

    cmd = argv[0]
    p = argparse.ArgumentParser(prog=f"herd {cmd}", description=DESCRIPTIONS[cmd],
                                formatter_class=HelpFormatter)
    p.add_argument("out", help="the folder to write (made if missing)")
    if cmd == "tiny-model":
        p.add_argument("--arch", choices=["llama", "qwen2"], default="llama",
                       help="mlx-lm architecture")
        p.add_argument("--layers", type=int, default=4, help="transformer blocks")
        p.add_argument("--hidden", type=int, default=64, help="hidden size")
        p.add_argument("--intermediate", type=int, default=None,
                       help="MLP size (default: twice --hidden)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="dtype the weights are stored in")
        p.add_argument("--shards", type=int, default=1,
                       help="weights in this many safetensors files, with an index (as the hub)")
        a = p.parse_args(argv[1:])
        path = make_tiny_model(a.out, a.arch, a.layers, a.hidden, a.seed,
                               intermediate=a.intermediate, dtype=a.dtype, shards=a.shards)
    else:
        p.add_argument("--format", choices=["text", "completions", "chat"], default="text",
                       help="mlx-lm's dataset format")
        p.add_argument("--train", type=int, default=200, help="records in train.jsonl")
        p.add_argument("--valid", type=int, default=40,
                       help="records in valid.jsonl (test.jsonl gets as many)")
        p.add_argument("--seed", type=int, default=0, help="seed of the records' choice")
        a = p.parse_args(argv[1:])
        path = make_tiny_data(a.out, a.format, a.train, a.valid, a.valid, seed=a.seed)
    print(path)
    return 0
