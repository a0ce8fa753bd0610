"""Registry descriptions: a fine-tuned version links (Markdown, relative) to the source version it started from."""

from __future__ import annotations

from medtransfer.registry import finetuned_version_description, model_version_link


def test_a_fine_tuned_version_links_its_source_version():
    assert model_version_link("source.natural", 2) == "[source.natural v2](#/models/source.natural/versions/2)"
    searched = finetuned_version_description("natural", "full", 1, 0, "3", "2", 0.85123)
    assert searched == ("Source `natural`, regime `full`: fold 1 (seed 0) of the best configuration (trial 3), "
                        "fine-tuned from [source.natural v2](#/models/source.natural/versions/2); test AUC 0.851.")
    preset = finetuned_version_description("natural", "full", 0, 0, "paper", "2", float("nan"))
    assert "of the `paper` protocol" in preset and preset.endswith("test AUC not measured.")
