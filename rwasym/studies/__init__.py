"""The paper's study (arXiv 2605.16600) built on the library: the embedded procedural language and its
preference pairs (`language`), the cached default pair (`default_pair`), the SmolLM2 real pair
(`real_pair`), the experiment schedules (`experiments`, `real`), the pre-registered effect-matched causal
test (`causal`) with its offline collateral text (`collateral`), the demo (`demo`) and the notebook setup
(`setup`). The top layer below the CLI: nothing else in rwasym imports it."""
