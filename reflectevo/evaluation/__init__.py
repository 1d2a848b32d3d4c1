"""Stage 05 (notebook 05): every variant on the test split, under each protocol and grader.

``variants`` plans what is evaluated and which adapter plays which role; ``evaluator`` runs first turns,
the protocols and second turns into graded predictions; ``metrics`` computes Acc@t1, Acc@t2, flips,
intervals, paired tests and the paper's tables; ``stage`` writes the result files (notebook 05 and
``reflectevo eval``).
"""
