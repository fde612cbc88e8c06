"""Transformers' GPT-2 format and lmtrain's GPT, both ways: settings and weights mapped exactly, a folder or a hub
name read (safetensors only, never an unpickled file), a model written as GPT2LMHeadModel's folder.

    pretrained = read_pretrained("gpt2", cache_dir, mirror)  # a hub name (huggingface_hub's cache) or a folder
    model = pretrained.model()                                # lmtrain's GPT with its weights, in float32
    write_gpt2(model, folder, eos_token_id)                   # config.json, model.safetensors, generation_config.json

transformers, safetensors and huggingface_hub are the optional extra lmtrain[hf], imported here only, when used.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, one_line
from .model import GPT, GPTConfig
from .sources import GPT2_ENCODER_JSON, fetch
from .tokenizer import from_state
from .tokenizer.hf import saved_state

EXTRA = ("transformers", "safetensors", "huggingface_hub")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's, which lmtrain's GPT uses
TO_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # model.mlp -> transformers' activation_function
FROM_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
GPT2_ON_THE_HUB = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
HUB_FILES += ["vocab.json", "tokenizer.json", "lmtrain_tokenizer.json"]  # what tells the tokenizer
GPT2_VOCAB = 50257

# lmtrain's weight names and transformers' (under "transformer.", a block's under "h.<i>."); Conv1D weights
# are stored transposed, (in, out).
EMBEDDINGS = (("wte.weight", "wte.weight", False), ("wpe.weight", "wpe.weight", False))
BLOCK = (
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
)
FINAL = (("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False))
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")  # the causal mask older GPT-2 files hold: not a weight


def weight_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(lmtrain's name, transformers' name without "transformer.", transposed) of every weight."""
    blocks = [(f"blocks.{i}.{ours}", f"h.{i}.{theirs}", t) for i in range(n_layer) for ours, theirs, t in BLOCK]
    return [*EMBEDDINGS, *blocks, *FINAL]


def require_extra(what: str) -> None:
    """A UserError naming the optional extra when transformers, safetensors or huggingface_hub is missing."""
    missing = []
    for package in EXTRA:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(
            f"{what} needs {', '.join(missing)}, not installed here: install the optional extra, "
            "pip install 'lmtrain[hf]' (in a checkout: pip install -e '.[hf]')"
        )


# --- out: lmtrain's GPT as transformers' GPT2LMHeadModel -----------------------------------------
def unexportable(config: GPTConfig) -> list[str]:
    """The model's options transformers' GPT-2 has no equivalent for, each named with its setting."""
    options = [
        (config.rope, "model.rope=true (rotary positions)"),
        (config.qk_norm, "model.qk_norm=true (QK-norm)"),
        (config.mlp not in TO_ACTIVATION, f"model.mlp={config.mlp} (ReLU²)"),
        (config.norm != "layernorm", f"model.norm={config.norm} (RMS norm without gains)"),
    ]
    return [name for used, name in options if used]


def gpt2_config(config: GPTConfig, eos_token_id: int | None):
    """GPT2Config of the model: its padded vocabulary (the padding ids are never drawn: generation_config)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.padded_vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function=TO_ACTIVATION[config.mlp],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def gpt2_weights(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (the tied head left out, as save_pretrained does); absent biases as zeros."""
    ours = model.state_dict()
    weights = {}
    for mine, theirs, transposed in weight_names(model.config.n_layer):
        tensor = ours.get(mine)
        if tensor is None:  # bias=false: the same function as a zero bias
            tensor = torch.zeros(ours[mine.removesuffix("bias") + "weight"].shape[0], dtype=ours["wte.weight"].dtype)
        weights[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).detach().cpu().contiguous()
    return weights


def write_gpt2(model: GPT, folder: Path, eos_token_id: int | None) -> None:
    """config.json, model.safetensors and generation_config.json: what GPT2LMHeadModel.from_pretrained reads.
    Generation runs to max_new_tokens as lmtrain's does (no end token) and never draws a padding id."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    gpt2_config(model.config, eos_token_id).save_pretrained(str(folder))
    save_file(gpt2_weights(model), str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    padding = list(range(model.config.vocab_size, model.config.padded_vocab_size))
    GenerationConfig(suppress_tokens=padding or None).save_pretrained(str(folder))


# --- in: a GPT-2 folder or hub name as lmtrain's GPT --------------------------------------------
@dataclass
class Pretrained:
    """A transformers GPT-2 as lmtrain reads it: its GPTConfig, tokenizer and weight files, checked."""

    source: str  # init_from, as given
    folder: Path
    config: GPTConfig
    tokenizer: object
    files: dict[str, Path]  # transformers' name of each weight (without "transformer.") -> its file

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under lmtrain's names, in float32, the head tied to the embedding."""
        tensors = read_tensors(self.files, self.source)
        weights = {}
        for mine, theirs, transposed in weight_names(self.config.n_layer):
            if mine.endswith("bias") and not self.config.bias:
                continue
            tensor = tensors[theirs].float()
            weights[mine] = tensor.t().contiguous() if transposed else tensor
        weights["lm_head.weight"] = weights["wte.weight"]
        return weights

    def model(self) -> GPT:
        with torch.device("meta"):  # shapes only: the weights are assigned, not copied
            model = GPT(self.config)
        model.load_state_dict(self.state_dict(), assign=True)
        model.lm_head.weight = model.wte.weight  # assign gave the head a Parameter of its own
        return model.eval()


def read_pretrained(source: str, cache_dir, mirror) -> Pretrained:
    """init_from: a folder in transformers' format or a hub name, checked against lmtrain's GPT (no weights read)."""
    require_extra(f"init_from={source}")
    folder = pretrained_folder(source)
    config = read_gpt2_config(folder, source)
    files = weight_files(folder, source)
    check_weights(config, files, source)
    tokenizer = pretrained_tokenizer(folder, config.vocab_size, source, cache_dir, mirror)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"init_from={source}: its tokenizer has {tokenizer.vocab_size} ids and its embedding "
            f"{config.vocab_size} rows; the folder mixes two models"
        )
    rows = config.vocab_size
    biases = [f"h.{i}.{theirs}" for i in range(config.n_layer) for _, theirs, _ in BLOCK if theirs.endswith("bias")]
    zero = all(not tensor.any() for tensor in read_tensors(files, source, [*biases, "ln_f.bias"]).values())
    shape = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        vocab_multiple=1 if rows == tokenizer.vocab_size else rows,  # the ids past the tokenizer's pad the table
        block_size=config.n_positions,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        dropout=0.0,
        bias=not zero,  # zero biases (an lmtrain export without them) compute what no biases do
        mlp=FROM_ACTIVATION[config.activation_function],
    )
    return Pretrained(source, folder, shape, tokenizer, files)


def pretrained_model(source: str, cache_dir, mirror) -> tuple[GPT, object]:
    """lmtrain's GPT and its tokenizer from `init_from`, for sampling."""
    pretrained = read_pretrained(source, cache_dir, mirror)
    return pretrained.model(), pretrained.tokenizer


def pretrained_folder(source: str) -> Path:
    """A local folder as it is; a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl or owner/name) through
    huggingface_hub: its cache, the network only when the file is not there (HF_HUB_OFFLINE=1: never)."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise UserError(
                f"init_from={source} {what}; give a folder in transformers' format (config.json, model.safetensors) "
                "or a hub name such as gpt2"
            )
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo = GPT2_ON_THE_HUB.get(source, source)
    local = "or give a local folder in transformers' format: init_from=/path/to/folder"
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError as err:
        raise UserError(
            f"init_from={source}: the Hugging Face hub has no model {repo} (or it is private or gated); give a hub "
            f"name such as gpt2, gpt2-medium, gpt2-large or gpt2-xl, {local}"
        ) from err
    except LocalEntryNotFoundError as err:
        raise UserError(
            f"init_from={source}: {repo} is not in huggingface_hub's cache and the hub cannot be reached (offline); "
            f"download it once where there is a network (hf download {repo}), {local}"
        ) from err
    except HFValidationError as err:
        raise UserError(f"init_from={source} is neither a folder here nor a hub name (owner/name); {local}") from err
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"init_from={source}: could not download {repo} ({one_line(err)[:200]}); {local}") from err


def read_gpt2_config(folder: Path, source: str):
    """GPT2Config of config.json, or a UserError for a file that is not one lmtrain's GPT can compute."""
    from transformers import GPT2Config

    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"init_from={source}: {folder} is not a transformers model (no config.json); give a folder that "
            "save_pretrained wrote, or a hub name such as gpt2"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        kind = raw.get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as err:
        raise UserError(f"init_from={source}: {path} is damaged or not a JSON object ({type(err).__name__})") from err
    if kind != "gpt2":
        raise UserError(
            f"init_from={source} is a {kind!r} model (model_type in config.json); lmtrain's GPT reads GPT-2 "
            "(model_type gpt2) only"
        )
    try:
        config = GPT2Config.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise UserError(f"init_from={source}: config.json is not a GPT-2 config ({one_line(err)[:200]})") from err
    problems = [
        (config.activation_function in FROM_ACTIVATION, f"activation_function={config.activation_function!r}"),
        (config.n_inner in (None, 4 * config.n_embd), f"n_inner={config.n_inner} (lmtrain's MLP is 4 x n_embd)"),
        (config.layer_norm_epsilon == LAYER_NORM_EPS, f"layer_norm_epsilon={config.layer_norm_epsilon}"),
        (config.scale_attn_weights, "scale_attn_weights=false"),
        (not config.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=true"),
        (not config.add_cross_attention, "add_cross_attention=true"),
        (config.tie_word_embeddings, "tie_word_embeddings=false (lmtrain's head is the embedding)"),
    ]
    sizes = [config.n_layer, config.n_head, config.n_embd, config.n_positions, config.vocab_size]
    problems.append((all(isinstance(s, int) and s >= 1 for s in sizes), "a size below 1"))
    problems.append((config.n_embd % max(config.n_head, 1) == 0, f"n_embd={config.n_embd} not divisible by n_head"))
    found = [what for ok, what in problems if not ok]
    if found:
        raise UserError(f"init_from={source}: config.json has {', '.join(found)}, which lmtrain's GPT cannot compute")
    return config


def weight_files(folder: Path, source: str) -> dict[str, Path]:
    """Each weight's safetensors file: model.safetensors, or the shards its index names. Pickled files
    (pytorch_model.bin) are never read: code of someone else's would run."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {name: folder / str(file) for name, file in weight_map.items()}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"init_from={source}: {index} is damaged ({type(err).__name__})") from err
    elif (folder / "model.safetensors").is_file():
        try:
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        except Exception as err:  # noqa: BLE001 - safetensors' own error for a damaged header
            raise UserError(
                f"init_from={source}: model.safetensors is damaged or not safetensors ({one_line(err)[:120]})"
            ) from err
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (it has {pickled[0]}: lmtrain never unpickles someone else's file)" if pickled else ""
        raise UserError(
            f"init_from={source}: {folder} has no model.safetensors{hint}; save the model with "
            "save_pretrained(folder), which writes safetensors"
        )
    names = {}
    for name, file in files.items():
        name = name.removeprefix("transformer.")
        if not MASK_BUFFER.fullmatch(name):
            names[name] = file
    return names


def check_weights(config, files: dict[str, Path], source: str) -> None:
    """Every weight of the config present with its shape, nothing else (a tied head may be stored too)."""
    from safetensors import safe_open

    C, V, P, L = config.n_embd, config.vocab_size, config.n_positions, config.n_layer
    expected = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    per_block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,)}
    per_block |= {"attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C)}
    per_block |= {"attn.c_proj.bias": (C,), "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,)}
    per_block |= {"mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    expected |= {f"h.{i}.{name}": shape for i in range(L) for name, shape in per_block.items()}
    head = files.get("lm_head.weight")
    missing = [name for name in expected if name not in files]
    extra = [name for name in files if name not in expected and name != "lm_head.weight"]
    if missing or extra:
        what = f"lack {', '.join(missing[:3])}" if missing else f"hold {', '.join(extra[:3])}, which GPT-2 has not"
        raise UserError(f"init_from={source}: its weights do not fit its config.json: they {what}")
    shapes = {}
    try:
        for file in sorted(set(files.values())):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    shapes[name.removeprefix("transformer.")] = tuple(f.get_slice(name).get_shape())
    except Exception as err:  # noqa: BLE001 - a missing shard, or safetensors' error for a damaged header
        raise UserError(f"init_from={source}: a weight file is missing or damaged ({one_line(err)[:160]})") from err
    if head is not None:
        expected["lm_head.weight"] = (V, C)
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise UserError(
                f"init_from={source}: weight {name} has shape {list(shapes.get(name, ()))}, its config.json "
                f"says {list(shape)}; the weights and config.json are of different models"
            )
    if head is not None:
        pair = read_tensors(files, source, ["lm_head.weight", "wte.weight"])
        if not torch.equal(pair["lm_head.weight"], pair["wte.weight"]):
            raise UserError(
                f"init_from={source}: its head (lm_head.weight) is not its embedding (wte.weight); lmtrain's GPT "
                "ties the two, so an untied head has no equivalent"
            )


def read_tensors(files: dict[str, Path], source: str, names=None) -> dict[str, torch.Tensor]:
    """The named weights (all by default) from their safetensors files."""
    from safetensors import safe_open

    wanted = list(files) if names is None else names
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    try:
        for file, in_file in by_file.items():
            with safe_open(str(file), "pt") as f:
                stored = {key.removeprefix("transformer."): key for key in f.keys()}
                tensors.update((name, f.get_tensor(stored[name])) for name in in_file)
    except Exception as err:  # noqa: BLE001 - safetensors' error for a file cut short
        raise UserError(f"init_from={source}: {file.name} is damaged ({one_line(err)[:160]})") from err
    return tensors


def pretrained_tokenizer(folder: Path, rows: int, source: str, cache_dir, mirror):
    """The tokenizer of the weights: the one lmtrain exported beside them (lmtrain_tokenizer.json), or GPT-2's
    when the folder's vocabulary is GPT-2's or, with no tokenizer file at all, the embedding has its 50257 ids."""
    state = saved_state(folder)
    if state is None:
        vocab = folder_vocabulary(folder, source)
        mirror_path = Path(mirror).expanduser() if mirror else None
        if vocab is None and rows < GPT2_VOCAB:
            raise UserError(
                f"init_from={source}: {folder} has no tokenizer files and {rows} ids, fewer than GPT-2's "
                f"{GPT2_VOCAB}; put the tokenizer it was trained with beside it"
            )
        gpt2 = json.loads(fetch(GPT2_ENCODER_JSON, Path(cache_dir).expanduser(), mirror_path).read_text("utf-8"))
        if vocab is not None and vocab != gpt2:
            raise UserError(
                f"init_from={source}: its tokenizer is neither GPT-2's nor one lmtrain exported "
                "(lmtrain_tokenizer.json); lmtrain samples and fine-tunes with those only"
            )
        state = {"kind": "gpt2"}
    try:
        return from_state(state, cache_dir, mirror)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(
            f"init_from={source}: lmtrain_tokenizer.json is damaged ({type(err).__name__}); export again"
        ) from err


def folder_vocabulary(folder: Path, source: str) -> dict | None:
    """token -> id of the folder's tokenizer (vocab.json, else tokenizer.json's model), None without either."""
    try:
        if (folder / "vocab.json").is_file():
            return json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if (folder / "tokenizer.json").is_file():
            return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
        raise UserError(f"init_from={source}: its tokenizer file is damaged ({type(err).__name__})") from err
    return None
