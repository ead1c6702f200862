"""Diffusion-DPO for SD 1.x/2.x: recipes/dpo.py under the name the design gives it (the family is
read from the model's UNet either way)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).with_name("dpo.py")), run_name="__main__")
