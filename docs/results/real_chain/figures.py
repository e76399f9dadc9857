"""Figures of the real-chain study drawn from its committed results.json (no model is loaded):
the strongest write direction's token readout. Reproduce: .venv/bin/python docs/results/real_chain/figures.py"""

import json
from pathlib import Path

from rwasym import report

HERE = Path(__file__).parent

if __name__ == "__main__":
    doc = json.loads((HERE / "results.json").read_text())
    strongest = max((r for r in doc["readouts"] if r["matrix"] and r["tokens"]), key=lambda r: r["sigma"])
    report.readout_tokens(strongest, HERE / "figures" / "readout_tokens.png")
    print(strongest["matrix"], strongest["direction"])
