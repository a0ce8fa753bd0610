"""Raw labels (folder names, CSV values, stored integers) → class indices, through a dataset's label map."""

from __future__ import annotations

from collections.abc import Sequence

from medtransfer.errors import DataError


class LabelResolver:
    """Raw labels (folder names, CSV values) → class indices, through the dataset's label map."""

    def __init__(self, classes: Sequence[str], label_map: dict[str, str] | None, where: str) -> None:
        self.classes = list(classes)
        self.label_map = label_map
        self.where = where

    def index(self, raw: str, context: str) -> int:
        raw = raw.strip()
        if self.label_map is not None:
            if raw not in self.label_map:
                known = ", ".join(sorted(self.label_map)[:12])
                raise DataError(
                    f"label '{raw}' ({context}) is not in the label map",
                    where=self.where,
                    fix=f"add it under 'label_map' (which maps: {known}) or remove the image",
                )
            return self.classes.index(self.label_map[raw])
        if raw in self.classes:
            return self.classes.index(raw)
        raise DataError(
            f"label '{raw}' ({context}) is not a class ({', '.join(self.classes)})",
            where=self.where,
            fix="add a 'label_map' from raw labels to class names, or fix the label",
        )
