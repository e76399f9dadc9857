"""Aligned pairs rwasym builds itself: the procedural language and its preference pairs (`language`),
the training loops (`train`), the cached embedded default pair (`default_pair`), the real pair
(`real_pair`: SmolLM2-135M and a DPO fine-tune on a text task) and the TRL backend."""
