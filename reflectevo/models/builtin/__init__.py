"""The built-in models: ``builtin:tiny``, a 4M-parameter stand-in trained here (``settings``, ``tokenizer``,
its corpus in ``attempts``, ``corpus`` and ``generic``, the quality ``checks`` and the locked one-time
``build``, put together in ``tiny``), and random weights in real shapes (``random_shapes``)."""
