"""Stage 4: evaluate what the other stages made, and show it.

- `evaluate.py`  `corral eval`: ROUGE-L against references, a pairwise judge in both orders
- `report.py`    `corral report`: one self-contained HTML page over datasets, runs and evaluations
- `svgplot.py`   dependency-free SVG charts for the report
- `commands.py`  the `corral eval` and `corral report` subcommands

It imports the stages it evaluates (inference answers the evaluation set; data_gen's endpoint
client asks a judge; data_gen's manifest describes a dataset) and the core, never the CLI.
"""
