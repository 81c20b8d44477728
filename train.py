"""Fine-tune a model on Alpaca JSON.

    accelerate launch [--config_file configs/accelerate/ddp.yaml] train.py \\
        --config configs/training/smoke.yaml [key=value ...]

The same as `corral train`; everything lives in the `training` package.
"""

import sys

from corral.training.commands import main

if __name__ == "__main__":
    sys.exit(main())
