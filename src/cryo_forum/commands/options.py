"""The one mapping from the library's setting names to the command line's option names.

Library errors (:class:`~cryo_forum.errors.InvalidSetting`) name a setting such as ``coarse_deg``; a command
reports it under the option that sets it (``--coarse``). An option is the setting's name with dashes unless
listed here; a setting the command has no option for keeps its own name.
"""

from __future__ import annotations

OPTION_OF_SETTING = {
    "coarse_deg": "--coarse",
    "refine_deg": "--refine",
    "max_shift_px": "--max-shift",
    "loss_schedule": "--loss-schedule",
    "kind": "--loss-schedule",
    "method": "--augment-method",
    "shift_step_px": "--shift-step",
    "outlier_fraction": "--outliers",
    "pixel_size": "--apix",
    "size": "--box-size",
    "input_size": "--box-size",
    "wiener_constant": "--wiener",
    "step_deg": "--refine-step",
    "shift_px": "--refine-shift",
    "wide_shift_px": "--wide-shift",
}


def option_name(setting: str, options: set[str]) -> str | None:
    """The option among ``options`` (a command's option strings) that sets ``setting``, if there is one."""
    option = OPTION_OF_SETTING.get(setting, "--" + setting.replace("_", "-"))
    return option if option in options else None


def setting_message(setting: str, message: str, options: set[str]) -> str:
    """``--option: message`` when the command has an option for the setting, else ``setting: message``."""
    return f"{option_name(setting, options) or setting}: {message}"
