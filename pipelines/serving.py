"""The registered MLflow model: a pyfunc that samples images from a DDPM snapshot (MLflow "models from code":
this file is logged as the model's code, so no pickled Python object is stored).

    model = mlflow.pyfunc.load_model("models:/ddpm-digits@champion")
    params = {"seed": 0, "method": "ddim", "num_steps": 50}
    images = model.predict(pandas.DataFrame({"index": range(16)}), params=params)
    # uint8 [16, H, W, C]; image i depends only on (seed, i)

Loading any MLflow pyfunc model executes its code (this file and ``ddpm_core``); the weights themselves are
safetensors and run nothing. Load registered models only from a registry you trust.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class DDPMSampler(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from ddpm_core.checkpoint import load_snapshot
        from ddpm_core.diffusion import GaussianDiffusion

        snapshot = load_snapshot(context.artifacts["snapshot"])
        self.model = snapshot.build_model()
        self.diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
        self.shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """``model_input["index"]``: sample indices; params: seed, method (ddim|ancestral), num_steps, eta."""
        from ddpm_core.data import to_uint8
        from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample

        settings = {
            "seed": 0,
            "method": "ddim",
            "num_steps": 50,
            "eta": 0.0,
            **(params or {}),
        }  # the signature's defaults
        indices = [int(i) for i in model_input["index"]]
        config = SamplerConfig(
            method=settings["method"], num_steps=int(settings["num_steps"]) or None, eta=float(settings["eta"])
        )
        result = sample(self.model, self.diffusion, self.shape, PerIndexNoise(int(settings["seed"]), indices), config)
        return to_uint8(result.samples)


mlflow.models.set_model(DDPMSampler())
