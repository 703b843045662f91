"""Content hashes that say what a prepared dataset or a reference cache was computed from."""
from __future__ import annotations

import glob
import hashlib
import json
import os


def sha256_file(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Call-time state of a fast tokenizer: transformers sets both on every call (and a tokenizer.json saved
# after SFT often carries them), so they say nothing about the ids dpo_ds asks for.
CALL_STATE = ("truncation", "padding")


def tokenizer_fingerprint(tokenizer) -> str:
    """What the token ids depend on: vocabulary, merges, normalisation, special tokens, chat template.
    Taken from the loaded tokenizer, so a byte-different but equivalent re-save hashes the same, and
    independent of the tokenizer's call-time truncation/padding state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = {k: v for k, v in json.loads(backend.to_str()).items() if k not in CALL_STATE}
    else:
        body = sorted(tokenizer.get_vocab().items())
    return sha256_json({"tokenizer": body, "chat_template": tokenizer.chat_template,
                        "special": tokenizer.special_tokens_map, "eos": tokenizer.eos_token_id})


def model_fingerprint(model_dir: str) -> dict:
    """The reference model as its files say: the config and a hash of every weight file.
    (Not a state_dict: under ZeRO-3 a partitioned state_dict does not reflect the weights.)"""
    weights = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("transformers_version", None)
    return {"config": sha256_json(config),
            "weights": sha256_json({os.path.basename(w): sha256_file(w) for w in weights})}
