"""Stages 03 and 04 (notebooks 03-04): LoRA SFT and DPO with TRL.

The face lists what the notebooks use; the parts are ``datasets`` (the training sets, screened),
``adapters`` (LoRA, merging), ``trainer`` (one phase with TRL) and ``stage`` (the variants, phase by phase).
"""

from reflectevo.training.datasets import (
    DPO_PHASES,
    DROP_REASONS,
    SFT_PHASES,
    end_of_turn,
    phase_examples,
    screened_set,
    screened_sets,
    variants_without_data,
)
from reflectevo.training.stage import run_dpo, run_sft, run_training_stage, training_plan

__all__ = [
    "DPO_PHASES",
    "DROP_REASONS",
    "SFT_PHASES",
    "end_of_turn",
    "phase_examples",
    "run_dpo",
    "run_sft",
    "run_training_stage",
    "screened_set",
    "screened_sets",
    "training_plan",
    "variants_without_data",
]
