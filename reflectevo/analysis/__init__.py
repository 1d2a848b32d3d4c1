"""Stage 06 (notebook 06): tables, figures and report.md.

``tables`` computes the dataset statistics, lengths, error localisation and the stability over rounds;
``report`` assembles report.md (``run_report`` is notebook 06's report cell). The figures are drawn by
:mod:`reflectevo.plots`.
"""
