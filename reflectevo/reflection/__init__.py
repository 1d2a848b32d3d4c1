"""Stage 02 (notebook 02): first trials, reflections, second trials; curation into D+, D± and Dpref.

``pipeline`` runs the two-trial loop over a split; ``curation`` builds D+, D± and Dpref and counts them;
``exports`` turns curated records into training rows and TRL-ready datasets; ``judges`` ranks reflections for
Dpref (the model itself, a local model or an OpenAI-compatible endpoint); ``released`` reads the paper's
released data as our records; ``stage`` wires model, engine, sandbox, pipeline and judge for notebook 02
and ``reflectevo generate``.
"""
