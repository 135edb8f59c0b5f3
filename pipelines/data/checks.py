"""Checks of what the later stages ask of the prepared data (e.g. enough hold-out images for the NLL bound), run by
the runner as soon as the prepare stage's outputs are known, before any Ray work."""

from __future__ import annotations

from ddpm_core.data import DataError
from pipelines.contracts import PrepareOutputs


def require_images(prepare: PrepareOutputs, needs: dict[str, bool]) -> None:
    """``needs``: what needs images (in words, with the setting) -> whether the splits have enough."""
    missing = [what for what, ok in needs.items() if not ok]
    if missing:
        raise DataError(
            f"data.uri {prepare.source_uri!r} leaves {prepare.num_train} training and {prepare.num_holdout} hold-out "
            f"images (data.holdout_fraction {prepare.holdout_fraction:g}), too few for {'; '.join(missing)}: use "
            "more images, or change those settings"
        )
