"""`resurgence bridge unlearn`: erase concepts from a local pipeline with any of the seven methods.

Every argument is checked before any weights load; a bad one exits with code 2 and one line on
stderr. torch/diffusers are imported inside the command so that `resurgence --help` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bridge.unlearning.names import METHOD_TABLE, all_method_names, resolve_method_name
from experiments import _validate as check
from experiments._validate import blame, one_line_errors

_TABLE = " ".join(f"{m.name}: {m.edits} ({m.defaults}; {m.source})." for m in METHOD_TABLE)

#: Explicit flags -> the method option they set (when the method has it).
_FLAGS = {
    "--steps": ("steps", "epochs", "lora_steps"),
    "--lr": ("lr",),
    "--lam": ("lam",),
    "--guidance": ("guidance",),
    "--rank": ("rank",),
    "--threshold": ("threshold",),
    "--sparsity": ("sparsity",),
    "--from-token": ("from_token",),
}


def _parse_options(name: str, given: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The method's options from the explicit flags and ``--option KEY=VALUE``, type-checked."""
    from bridge.unlearning.run import method_options

    valid = method_options(name)
    options: dict[str, Any] = {}
    for flag, value in given.items():
        if value is None:
            continue
        key = next((k for k in _FLAGS[flag] if k in valid), None)
        if key is None:
            owners = [
                m.name
                for m in METHOD_TABLE
                if any(k in method_options(m.name) for k in _FLAGS[flag])
            ]
            raise check.UsageError(
                f"`{flag}` does not apply to method {check.quote(name)}; it is an option of "
                f"{', '.join(owners)}."
            )
        options[key] = value
    for item in extra:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            raise check.UsageError(
                f"`--option` {check.quote(item)} must be KEY=VALUE with KEY one of "
                f"{', '.join(valid)} (the options of {name})."
            )
        default = valid[key]
        try:
            if isinstance(default, bool):
                value: Any = text.strip().lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(text)
            elif default is None:  # an optional count or number: an int if it reads as one
                word = text.strip().lower()
                value = (
                    None
                    if word == "none"
                    else int(word)
                    if word.lstrip("-").isdigit()
                    else float(word)
                )
            elif isinstance(default, float):
                value = float(text)
            elif isinstance(default, (tuple, list)):  # e.g. MACE's templates: 'a photo of {}|{}'
                value = tuple(text.split("|"))
            else:
                value = text
        except ValueError:
            raise check.UsageError(
                f"`--option` {check.quote(item)}: {key} takes a {type(default).__name__}."
            ) from None
        options[key] = value
    _check_ranges(options)
    return options


def _check_ranges(options: dict[str, Any]) -> None:
    if "rank" in options and not (isinstance(options["rank"], int) and options["rank"] >= 1):
        raise check.UsageError(
            f"`--rank` (MACE's LoRA rank) must be an integer >= 1; got {options['rank']!r}."
        )
    for key in ("threshold", "sparsity"):
        if key in options and not 0.0 < options[key] < 1.0:
            raise check.UsageError(
                f"`--{key}` must be in (0, 1), a fraction of the UNet's entries; got "
                f"{options[key]!r}."
            )
    if options.get("lr") is not None:
        check.positive("--lr", options["lr"])
    for key in ("lam", "guidance"):
        if options.get(key) is not None:
            check.at_least(f"--{key}", options[key], 0.0)
    for key in ("steps", "epochs"):
        if key in options and options[key] is not None:
            check.at_least("--steps", options[key], 1)
    if "lora_steps" in options:
        check.at_least("--steps", options["lora_steps"], 0)
    if options.get("from_token") not in (None, "last", "first"):
        check.choice("--from-token", options["from_token"], ("last", "first"))


def _check_base(base: Path) -> None:
    from bridge.loading import _STATE_DICT_SUFFIXES, checkpoint_layout

    if base.is_file() and base.suffix in _STATE_DICT_SUFFIXES:
        with blame("--base", base):
            from bridge.loading import load_state_dict_file

            layout = checkpoint_layout(load_state_dict_file(base))
        kind = "a CompVis/LDM checkpoint" if layout == "ldm" else "a single weights file"
        raise check.UsageError(
            f"`--base` {check.quote(base)} is {kind}; converting it needs the base pipeline's "
            "unet/config.json: give `--base` the diffusers pipeline folder and this file as "
            "`--base-unet`."
        )
    check.unet_folder("--base", base)
    check.pipeline_parts(
        "--base",
        base,
        {"text_encoder": "config.json", "tokenizer": None, "scheduler": "scheduler_config.json"},
    )


def _mace_folders(folder: Path, erase: list[str]) -> dict[str, tuple[Path, Path | None]]:
    """MACE's data layout: ``folder/<prompt>/`` images, ``folder/<prompt> mask/`` masks."""
    from bridge.data import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise check.UsageError(
            f"`--mace-data` {check.quote(folder)} is not a folder; give one sub-folder of images "
            "per erased prompt (and '<prompt> mask/' beside it), as MACE's input_data_dir."
        )
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.endswith(" mask"))
    if sorted(erase) != subs:
        raise check.UsageError(
            f"`--mace-data` {check.quote(folder)}: its image folders {subs} do not match the "
            f"erased concepts {sorted(erase)}; give one folder named after each --erase prompt."
        )
    found = {}
    for prompt in erase:
        images = sorted(
            p for p in (folder / prompt).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        mask_dir = folder / f"{prompt} mask"
        masks = None
        if mask_dir.is_dir():
            masks = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(masks) != len(images):
                raise check.UsageError(
                    f"`--mace-data`: {len(masks)} masks in {check.quote(mask_dir)} for "
                    f"{len(images)} images of {check.quote(prompt)}; the masks do not match the "
                    "concept's images (one mask per image, paired in sorted order)."
                )
        if not images:
            raise check.UsageError(f"`--mace-data`: no images in {check.quote(folder / prompt)}.")
        found[prompt] = (folder / prompt, mask_dir if masks is not None else None)
    return found


def _mace_concepts(base: Path, folders, unet):
    from bridge.data import IMAGE_SUFFIXES
    from bridge.unlearning.data import read_images, to_model_space
    from bridge.unlearning.mace import MaceConcept

    vae = (base / "vae").is_dir()
    size = unet.config.sample_size * (8 if vae else 1)
    concepts = []
    for prompt, (img_dir, mask_dir) in folders.items():
        files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = to_model_space(base, read_images(files, size, "RGB"), unet)
        masks = None
        if mask_dir is not None:
            mfiles = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            masks = (read_images(mfiles, size, "L") > 0.0).float()
        concepts.append(MaceConcept(prompt, images, masks))
    return concepts


def _caption_data(base: Path, folder: Path, unet, erase: list[str], preserve: list[str]):
    from bridge.data import encode_caption_folder
    from bridge.unlearning.data import UnlearningData

    ref = next(unet.parameters())
    latents, captions = encode_caption_folder(
        base, folder, unet, device=ref.device, dtype=ref.dtype
    )
    other = sorted({c for c in captions if c not in erase and c not in preserve})
    if other:
        raise ValueError(
            f"captions {other} are neither an --erase nor a --preserve prompt; every image must "
            "be forget data (an erased prompt) or retain data (a preserved prompt)"
        )
    f = [i for i, c in enumerate(captions) if c in erase]
    r = [i for i, c in enumerate(captions) if c in preserve]
    if not f:
        raise ValueError(f"no image is captioned with an erased prompt {erase}")
    return UnlearningData(
        latents[f], [captions[i] for i in f], latents[r] if r else None, [captions[i] for i in r]
    )


@one_line_errors
def unlearn(
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            help="Base pipeline folder (local: unet/ text_encoder/ tokenizer/ scheduler/).",
        ),
    ],
    erase: Annotated[
        list[str],
        typer.Option(
            "--erase", help="Prompt to erase (repeat for several concepts; MACE: 10 or more)."
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help=f"One of {', '.join(all_method_names())} (theory's spelling; esd-x is "
            f"accepted). {_TABLE}",
        ),
    ] = "uce",
    anchor: Annotated[
        list[str] | None,
        typer.Option(
            "--anchor",
            help="Anchor per erased prompt: UCE anchor, MACE mapping, SalUn/SHS/EraseDiff "
            "pseudo prompt (default: the empty prompt; data methods: the first --preserve).",
        ),
    ] = None,
    preserve: Annotated[
        list[str] | None,
        typer.Option(
            "--preserve",
            help="Prompt to keep (repeatable): UCE/MACE preserved tokens, retain data.",
        ),
    ] = None,
    base_unet: Annotated[
        Path | None,
        typer.Option(
            "--base-unet",
            help="Start from these UNet weights (.safetensors/.ckpt, diffusers or "
            "CompVis/LDM layout, converted with --base's unet/config.json).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="SalUn/SHS/EraseDiff: captioned images (erased prompts = forget data, "
            "preserved prompts = retain data); default: generated by the base.",
        ),
    ] = None,
    mace_data: Annotated[
        Path | None,
        typer.Option(
            "--mace-data",
            help="MACE: DIR/<prompt>/ images and DIR/<prompt> mask/ masks per erased "
            "prompt (MACE's layout); default: generated images, no masks.",
        ),
    ] = None,
    per_prompt: Annotated[
        int,
        typer.Option(
            "--per-prompt", help="Images generated per prompt when no data folder is given."
        ),
    ] = 8,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="ESD/SDD/SalUn/SHS steps, EraseDiff epochs, MACE LoRA steps."),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    lam: Annotated[
        float | None,
        typer.Option("--lam", help="UCE/MACE ridge lambda; Scissorhands' forget weight."),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="ESD negative guidance g.")
    ] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="MACE LoRA rank (>= 1).")] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="SalUn saliency threshold in (0, 1).")
    ] = None,
    sparsity: Annotated[
        float | None, typer.Option("--sparsity", help="Scissorhands sparsity in (0, 1).")
    ] = None,
    from_token: Annotated[
        str | None,
        typer.Option(
            "--from-token", help="UCE token tail: 'last' word (published) or 'first' word on."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="Any other option of the method, KEY=VALUE (repeatable; a list as A|B).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output pipeline folder (+ manifest.json).")
    ] = Path("runs/bridge_unlearn"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the method's draws.")] = 0,
    device: Annotated[str, typer.Option("--device", help="torch device (cpu, cuda).")] = "cpu",
) -> None:
    """Unlearn concepts from a local pipeline with UCE, ESD-x/-u, SDD, SalUn, Scissorhands,
    EraseDiff or MACE; writes a pipeline folder with manifest.json (method, args, seed, base
    fingerprint)."""
    try:
        resolved = resolve_method_name(method)
    except ValueError as err:
        raise check.UsageError(f"`--method`: {err}") from None
    if resolved.note:
        typer.echo(f"Note: {resolved.note}", err=True)
    name = resolved.name
    erase, preserve = list(erase), list(preserve or [])
    options = _parse_options(
        name,
        {
            "--steps": steps,
            "--lr": lr,
            "--lam": lam,
            "--guidance": guidance,
            "--rank": rank,
            "--threshold": threshold,
            "--sparsity": sparsity,
            "--from-token": from_token,
        },
        list(option or []),
    )
    check.at_least("--per-prompt", per_prompt, 1)
    _check_base(base)
    if base_unet is not None:
        check.unlearned_weights("--base-unet", base_unet)
    if data is not None:
        check.caption_folder("--data", data)
    folders = _mace_folders(mace_data, erase) if mace_data is not None and name == "mace" else None
    from bridge.unlearning.run import DATA_METHODS

    if name in DATA_METHODS and not preserve:
        raise check.UsageError(
            f"method {name} trains on retain data: give at least one `--preserve` prompt."
        )

    from bridge.loading import load_unet, load_unet_weights
    from bridge.sd import load_text_encoder
    from bridge.unlearn_io import save_unlearned
    from bridge.unlearning.run import unlearn as run_unlearn

    t0 = time.time()
    with blame("--base", base):
        unet = load_unet(base, device=device)
    if base_unet is not None:
        with blame("--base-unet", base_unet):
            unet = load_unet_weights(base_unet, config=base, device=device)
    extra: dict[str, Any] = {}
    if data is not None and name in DATA_METHODS:
        with blame("--data", data):
            extra["data"] = _caption_data(base, data, unet, erase, preserve)
    if folders is not None:
        with blame("--mace-data", mace_data):
            extra["concepts"] = _mace_concepts(base, folders, unet)
    with blame("--base", base):  # last: transformers prints a loading bar
        text = load_text_encoder(base, device=device)
        scheduler = _scheduler(base)
    try:
        outcome = run_unlearn(
            name,
            unet,
            text,
            scheduler,
            erase,
            preserve=preserve,
            anchors=list(anchor) if anchor else None,
            per_prompt=per_prompt,
            seed=seed,
            **extra,
            **options,
        )
    except ValueError as err:
        raise check.UsageError(str(err)) from None
    args = {**outcome.args, "base_unet": str(base_unet) if base_unet else None}
    save_unlearned(
        outcome.unet,
        out,
        method=name,
        args=args,
        seed=outcome.seed,
        base_unet=unet,
        base_folder=base,
    )
    typer.echo(f"{name}: erased {erase} in {time.time() - t0:.1f} s -> {out}")


def _scheduler(folder: Path):
    """The training scheduler saved in ``folder/scheduler/`` (its class named in the config)."""
    import json

    import diffusers

    sched_dir = folder / "scheduler"
    cls = json.loads((sched_dir / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, cls).from_pretrained(str(sched_dir))
