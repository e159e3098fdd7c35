"""The loss terms of the self-distillation step, in the order their weighted losses are summed.

A new term is one file here with a :class:`~fovea.methods.terms.base.Term` subclass, and one entry below.
"""
from __future__ import annotations

from fovea.methods.terms.base import Outputs, Parts, StepInput, Term, sum_terms
from fovea.methods.terms.dino import DINOTerm
from fovea.methods.terms.gram import GramTerm
from fovea.methods.terms.ibot import IBOTTerm
from fovea.methods.terms.koleo import KoLeoTerm

TERMS: tuple[type[Term], ...] = (DINOTerm, IBOTTerm, KoLeoTerm, GramTerm)

__all__ = ["TERMS", "Outputs", "Parts", "StepInput", "Term", "sum_terms"]
