"""Lightning modules: the language-model training recipe, optimizer groups and schedules."""

from mf_lightning.lit.module import LanguageModel

__all__ = ["LanguageModel"]
