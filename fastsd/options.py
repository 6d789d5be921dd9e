"""Options as the user sets them where they are: a field of a notebook cell's form, or a
flag of the ``fastsd`` command.

:data:`OPTIONS` is the one table of each option's flag (and the command that takes it) and
its form field (and the notebook cell that holds it); :data:`CELLS` names the notebooks'
cells. A message that tells the user what to change names the option through :func:`say`,
and a step to take first through :func:`run`, so the same advice reads "tick Restart in
cell 6 (Train)" in a notebook and "run 'fastsd train dog --restart'" on the command line.
The caller is a notebook when a notebook cell called :func:`fastsd.env.form` in this
process, or in the process that started it (:func:`fastsd.env.caller`).
tests/test_notebooks.py checks this table against the notebooks and the CLI's parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastsd import env

TRAIN_NB = "fast_dreambooth.ipynb"
WEBUI_NB = "webui.ipynb"

#: The titles of each notebook's cells, in order (cell N is the Nth).
CELLS: dict[str, tuple[str, ...]] = {
    TRAIN_NB: ("Install", "Drive and session", "Base model", "Instance images",
               "Captions and crop", "Train", "Try it", "Convert",
               "Upload to the Hugging Face Hub", "Free Drive space"),
    WEBUI_NB: ("Install", "Drive and model", "ControlNet models", "Launch", "Stop"),
}

TRAIN = "fastsd train SESSION"
SESSION_SET = "fastsd session set SESSION"
IMPORT = "fastsd images import SESSION PHOTOS"


@dataclass(frozen=True)
class Option:
    """One option: the command and flag that set it on the command line, and the form
    fields that set it in the notebooks, as (notebook, cell number, field). An option with
    no field of its own that a preset sets gives the field and value that set it in
    ``preset`` (the notebook's GPU_Preset). A ``box`` is ticked in the form and given
    without a value on the command line; a ``negatable`` one is turned off there with
    ``--no-FLAG`` (a setting kept in the session, not an action)."""

    command: str | None
    flag: str | None
    fields: tuple[tuple[str, int, str], ...] = ()
    preset: tuple[str, int, str, str] | None = None
    metavar: str = "N"
    box: bool = False
    negatable: bool = False


def _t(field: str) -> tuple[tuple[str, int, str], ...]:
    return ((TRAIN_NB, 6, field),)


def _box(command: str, flag: str | None, *fields: tuple[str, int, str], **kw: Any) -> Option:
    return Option(command, flag, fields, box=True, **kw)


_T4 = (TRAIN_NB, 6, "GPU_Preset", "t4")  # batch 1, 8-bit Adam, gradient checkpointing

OPTIONS: dict[str, Option] = {
    # the session (fastsd session create/set; cells 2 and 3)
    "session": Option("fastsd session create", None,
                      ((TRAIN_NB, 2, "Session_Name"), (WEBUI_NB, 2, "Session"))),
    "instance_token": Option(SESSION_SET, "--token", ((TRAIN_NB, 2, "Instance_Token"),)),
    "class_word": Option(SESSION_SET, "--class", ((TRAIN_NB, 2, "Class_Word"),)),
    "resolution": Option(SESSION_SET, "--resolution", ((TRAIN_NB, 2, "Resolution"),)),
    "change_settings": _box(SESSION_SET, None, (TRAIN_NB, 2, "Change_Settings")),
    "base_model": Option(SESSION_SET, "--model",
                         ((TRAIN_NB, 3, "Base_Model"), (WEBUI_NB, 2, "Model")), metavar="MODEL"),
    "change_base_model": _box(SESSION_SET, None, (TRAIN_NB, 3, "Change_Base_Model")),
    "temp_storage": _box(SESSION_SET, "--temp-storage", (TRAIN_NB, 3, "Use_Temp_Storage"),
                         negatable=True),
    "import_old_session": Option("fastsd images import-legacy SOURCE", None,
                                 ((TRAIN_NB, 2, "Import_Old_Session"),)),
    # photos (fastsd images import and remove; cell 4)
    "source": Option(IMPORT, None, ((TRAIN_NB, 4, "Source"),)),
    "remove_existing_images": _box(IMPORT, "--remove-existing",
                                   (TRAIN_NB, 4, "Remove_Existing_Images")),
    "remove_photos": Option("fastsd images remove SESSION NAME", None,
                            ((TRAIN_NB, 4, "Remove_Photos"),)),
    # training (fastsd train; cell 6)
    "resume": _box(TRAIN, "--resume", *_t("Resume")),
    "restart": _box(TRAIN, "--restart", *_t("Restart")),
    "accept_changed_data": _box(TRAIN, "--accept-changed-data", *_t("Accept_Changed_Photos")),
    "method": Option(TRAIN, "--method", _t("Method"), metavar="METHOD"),
    "rank": Option(TRAIN, "--rank", _t("LoRA_Rank")),
    "alpha": Option(TRAIN, "--alpha", _t("LoRA_Alpha")),
    "lora_dropout": Option(TRAIN, "--lora-dropout"),
    "unet_steps": Option(TRAIN, "--unet-steps", _t("UNet_Steps")),
    "unet_lr": Option(TRAIN, "--unet-lr", _t("UNet_Learning_Rate")),
    "text_steps": Option(TRAIN, "--text-steps", _t("Text_Encoder_Steps")),
    "text_lr": Option(TRAIN, "--text-lr", _t("Text_Encoder_Learning_Rate")),
    "preset": Option(TRAIN, "--preset", _t("GPU_Preset")),
    "checkpoint_every": Option(TRAIN, "--checkpoint-every", _t("Checkpoint_Every")),
    "sample_every": Option(TRAIN, "--sample-every", _t("Sample_Every")),
    "sample_prompts": Option(TRAIN, "--sample-prompt", _t("Sample_Prompts")),
    "flip": _box(TRAIN, "--flip", *_t("Flip_Images")),
    "offset_noise": Option(TRAIN, "--offset-noise", _t("Offset_Noise")),
    "prior_preservation": _box(TRAIN, "--prior-preservation", *_t("Prior_Preservation")),
    "class_images": Option(TRAIN, "--class-images", _t("Class_Images")),
    "class_prompt": Option(TRAIN, "--class-prompt", _t("Class_Prompt"), metavar="TEXT"),
    "prior_weight": Option(TRAIN, "--prior-weight", _t("Prior_Weight")),
    "save_every": Option(TRAIN, "--save-every", _t("Save_Single_File_Every")),
    "save_from": Option(TRAIN, "--save-from", _t("Start_Saving_From_Step")),
    "more_unet_steps": Option(TRAIN, "--more-unet-steps", _t("More_UNet_Steps")),
    "more_text_steps": Option(TRAIN, "--more-text-steps", _t("More_Text_Encoder_Steps")),
    "disconnect": _box(TRAIN, "--disconnect", *_t("Disconnect_After_Training")),
    "batch_size": Option(TRAIN, "--batch-size", preset=_T4),
    "adam_8bit": _box(TRAIN, "--adam-8bit", preset=_T4),
    "gradient_checkpointing": _box(TRAIN, "--gradient-checkpointing", preset=_T4),
    "save_precision": Option(TRAIN, "--save-precision", preset=_T4),
    "keep_checkpoints": Option(TRAIN, "--keep-checkpoints"),
    # trying the model (cell 7): a LoRA session's LoRA at this weight in the prompt
    # (<lora:NAME:WEIGHT> on the command line and in the web UI)
    "lora_weight": Option(None, None, ((TRAIN_NB, 7, "LoRA_Weight"),)),
    # the web UI (fastsd serve; cell 7, and webui.ipynb's cell 4)
    "port": Option("fastsd serve", "--port", ((TRAIN_NB, 7, "Port"), (WEBUI_NB, 4, "Port"))),
    "user": Option("fastsd serve", "--user", ((WEBUI_NB, 4, "User"),)),
    "ngrok_token": Option("fastsd ngrok-token", None,
                          ((TRAIN_NB, 7, "Ngrok_Token"), (WEBUI_NB, 4, "Ngrok_Token"))),
    "save_ngrok_token": _box("fastsd ngrok-token", None, (TRAIN_NB, 7, "Save_Ngrok_Token"),
                             (WEBUI_NB, 4, "Save_Ngrok_Token")),
    # Drive space (fastsd space; cell 10)
    "delete": Option("fastsd space", "--delete", ((TRAIN_NB, 10, "Delete"),)),
    "confirm_delete": _box("fastsd space", "--yes", (TRAIN_NB, 10, "Confirm")),
}

#: Steps a message may ask for first: the command, and the cell that takes the step (None:
#: no cell does, and the command is said everywhere).
STEPS: dict[str, tuple[str, tuple[str, int] | None]] = {
    "install": ("fastsd install", (TRAIN_NB, 1)),
    "session": ("fastsd session create SESSION", (TRAIN_NB, 2)),
    "base_model": ("fastsd session set SESSION --model NAME", (TRAIN_NB, 3)),
    "images": ("fastsd images import SESSION PHOTOS", (TRAIN_NB, 4)),
    "captions": ("fastsd captions auto SESSION", (TRAIN_NB, 5)),
    "train": ("fastsd train SESSION", (TRAIN_NB, 6)),
    "model": ("fastsd models get NAME", (WEBUI_NB, 2)),
    "controlnet": ("fastsd models controlnet get NAME", (WEBUI_NB, 3)),
    "lora_merge": ("fastsd lora merge SESSION", None),
}


def notebook() -> str | None:
    """The notebook whose cell is the caller (its file name), ``env.NOTEBOOK`` when a
    notebook's cell without a title is, None on the command line."""
    who = env.caller()
    if not who:
        return None
    number, _, title = who.partition(". ")
    for name, titles in CELLS.items():
        if number.isdigit() and 0 < int(number) <= len(titles) and \
                titles[int(number) - 1] == title:
            return name
    return env.NOTEBOOK


def cell(where: tuple[str, int]) -> str:
    """``"cell 6 (Train)"``, with the notebook's name when it is not the caller's."""
    name, number = where
    text = f"cell {number} ({CELLS[name][number - 1]})"
    return text if notebook() in (name, env.NOTEBOOK) else f"{text} of {name}"


def _field(option: Option) -> tuple[str, int, str] | None:
    """The option's field in the caller's notebook, else in the first that has it."""
    here = [f for f in option.fields if f[0] == notebook()]
    return (here or list(option.fields) or [None])[0]


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def say(*settings: str | tuple[str, Any], session: str = "SESSION") -> str:
    """How to set ``settings`` here, as an imperative: each is an option's name (a flag,
    or a box to tick) or (name, value); a box's value False unticks it. In a notebook:
    "tick Resume and set UNet_Steps to 2500 in cell 6 (Train)"; on the command line:
    "run 'fastsd train dog --resume --unet-steps 2500'" (``session`` names the session in
    the command). An option with no field (nor preset) in the notebooks is said as on the
    command line, everywhere."""
    pairs = [(s, None) if isinstance(s, str) else s for s in settings]
    if notebook() is None:
        return _say_flags(pairs, session)
    by_cell: dict[tuple[str, int], list[str]] = {}
    for name, value in pairs:
        option = OPTIONS[name]
        field = _field(option)
        if field is None and option.preset is not None:
            *field, value = option.preset
            field = tuple(field)
        if field is None:  # only on the command line
            return _say_flags(pairs, session)
        if value is None and option.box:
            phrase = f"tick {field[2]}"
        elif value is False and option.box:
            phrase = f"untick {field[2]}"
        elif value is None:
            phrase = f"set {field[2]}"
        else:
            phrase = f"set {field[2]} to {_value(value)}"
        phrases = by_cell.setdefault(field[:2], [])
        if phrase not in phrases:
            phrases.append(phrase)
    return "; ".join(f"{_and(p)} in {cell(where)}" for where, p in by_cell.items())


def _and(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _say_flags(pairs: list[tuple[str, Any]], session: str) -> str:
    commands: dict[str, list[str]] = {}
    for name, value in pairs:
        option = OPTIONS[name]
        flags = commands.setdefault(option.command or "fastsd", [])
        if option.flag and option.box:
            off = [option.flag.replace("--", "--no-", 1)] if option.negatable else []
            flags += [option.flag] if value in (None, True) else off  # False: left out
        elif option.flag:
            flags.append(f"{option.flag} {option.metavar if value is None else value}")
    return " and ".join(f"run '{' '.join([c.replace('SESSION', session), *f])}'"
                        for c, f in commands.items())


def name(option: str) -> str:
    """An option as the user knows it here: its form field in a notebook ("UNet_Steps"),
    its flag on the command line ("--unet-steps"); an option not in the table, as named."""
    known = OPTIONS.get(option)
    field = _field(known) if known is not None and notebook() is not None else None
    if field is not None:
        return field[2]
    return known.flag if known is not None and known.flag else option


def run(step: str, session: str = "SESSION") -> str:
    """How to take ``step`` (a key of :data:`STEPS`) here: "run cell 6 (Train)" in a
    notebook, "run 'fastsd train dog'" on the command line (and everywhere for a step no
    cell takes)."""
    command, where = STEPS[step]
    if notebook() is None or where is None:
        return f"run '{command.replace('SESSION', session)}'"
    return f"run {cell(where)}"
