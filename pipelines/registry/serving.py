"""The registered MLflow model: a pyfunc that samples images from a DDPM snapshot (MLflow "models from code":
this file is logged as the model's code, so no pickled Python object is stored).

    model = mlflow.pyfunc.load_model("models:/ddpm-digits@champion")
    params = {"seed": 0, "method": "dpm_solver++_2m", "num_steps": 20, "spacing": "log_snr"}
    images = model.predict(pandas.DataFrame({"index": range(16)}), params=params)
    # uint8 [16, H, W, C]; image i depends only on (seed, i)

A class-conditional model also reads a ``label`` column (the class of each image) and the ``guidance_scale``
param (w of Ho & Salimans 2022, Eq. 6; 0 is unguided; the default is the one the model was evaluated with), applied
in the interval of noise levels the model was evaluated with (model config ``guidance_interval``; none: every step):

    sevens = model.predict(pandas.DataFrame({"index": range(10), "label": [7] * 10}), params={"guidance_scale": 1.0})

``params={"progressive_frames": F}`` returns, for each image in turn, F predictions of x_0 along its chain (Ho et al.
2020, Sec. 4.3), the last being the sample: uint8 ``[n * F, H, W, C]``.

Rows are sampled ``batch_size`` at a time (default 64) and the batches concatenated, so that memory is bounded by the
batch, not the request: 100,000 rows no longer hold 100,000 images' activations at once. Set it when loading,
``mlflow.pyfunc.load_model(uri, model_config={"batch_size": 256})`` (any registered version), or per request with
``params={"batch_size": 256}`` where the model's signature lists that param. Each row's noise comes from its own
generator seeded by (seed, index) (:class:`ddpm_core.samplers.PerIndexNoise`), so the images do not depend on the
batch size: bit-identical on the CPU (tests/test_plan_checks.py); a GPU may pick other kernels per batch shape.

Loading any MLflow pyfunc model executes its code (this file and ``ddpm_core``); the weights themselves are
safetensors and run nothing. Load registered models only from a registry you trust.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

BATCH_SIZE = 64  # rows sampled at once, unless the model config or the request's params say otherwise
DEFAULTS = {
    "seed": 0,
    "method": "ddim",
    "num_steps": 50,
    "eta": 0.0,
    "spacing": "",  # "": the method's own (ddpm_core.samplers.Method.default_spacing)
    "progressive_frames": 0,
}


def positive_batch_size(value: Any, where: str) -> int:
    """``batch_size`` as a positive int (an int or a string of digits); else a ``ValueError`` naming where it was
    set."""
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size ({where}) must be a positive integer (rows sampled at once), got {value!r}")
    return int(text)


class DDPMSampler(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from ddpm_core.checkpoint import load_snapshot
        from ddpm_core.diffusion import GaussianDiffusion

        snapshot = load_snapshot(context.artifacts["snapshot"])
        self.snapshot = snapshot  # a snapshot stored with an autoguidance guide samples guided (autoguidance_weight)
        self.model = snapshot.sampling_model()
        self.diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
        self.shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
        # a latent model's decoder, from the autoencoder folder logged with it (verified by its SHA-256)
        self.to_images = snapshot.image_decoder(folder=context.artifacts.get("autoencoder"))
        self.latent = snapshot.latent_space is not None
        self.num_classes = snapshot.unet.num_classes
        model_config = context.model_config or {}
        self.guidance_scale = float(model_config.get("guidance_scale", 0.0))
        interval = model_config.get("guidance_interval")  # the noise levels (low, high] it guides at; None: all
        self.guidance_interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.batch_size = positive_batch_size(model_config.get("batch_size", BATCH_SIZE), "model_config")

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """``model_input["index"]``: sample indices (and ``["label"]``: classes, conditional models); params: seed,
        method (ddim|ancestral|dpm_solver++_2m|heun), num_steps, eta (ddim), spacing (linspace|leading|trailing|
        log_snr|karras; default: the method's own), progressive_frames (0: the samples only), guidance_scale
        (conditional models), autoguidance_weight (a model registered with an autoguidance guide; default: its
        own) and batch_size (rows sampled at once; the model config's, else 64). The rows are sampled
        batch after batch and the images concatenated in row order: the same images as one batch of all rows, in
        memory bounded by the batch."""
        settings = {**DEFAULTS, **(params or {})}
        batch_size = (
            positive_batch_size(settings["batch_size"], "params") if "batch_size" in settings else self.batch_size
        )
        indices = [int(i) for i in model_input["index"]]
        network, labels = self.autoguided(settings.get("autoguidance_weight")), None
        if self.num_classes is not None:
            scale = float(settings.get("guidance_scale", self.guidance_scale))
            network, labels = self.guided(network, model_input, scale)
        batches = [
            self.sample_rows(
                network,
                indices[start : start + batch_size],
                None if labels is None else labels[start : start + batch_size],
                settings,
            )
            for start in range(0, max(len(indices), 1), batch_size)
        ]
        return np.concatenate(batches) if len(batches) > 1 else batches[0]

    def sample_rows(self, network: Any, indices: list[int], labels: Any, settings: dict[str, Any]) -> np.ndarray:
        """The images of one batch of rows: uint8 ``[n, H, W, C]``, or ``[n * F, H, W, C]`` with progressive frames
        (each image's F predictions of x_0, Ho et al. 2020, Sec. 4.3, image after image)."""
        from ddpm_core.data import to_uint8
        from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample

        config = SamplerConfig(
            method=settings["method"],
            num_steps=int(settings["num_steps"]) or None,
            eta=float(settings["eta"]),
            spacing=settings["spacing"] or None,
            clip_denoised=not self.latent,  # a latent model's x_0 is not bounded by [-1, 1]
        )
        noise = PerIndexNoise(int(settings["seed"]), indices)  # row i's noise depends on (seed, index i) alone
        kwargs = None if labels is None else {"class_labels": labels}
        frames = int(settings["progressive_frames"])
        steps = config.num_steps or self.diffusion.num_timesteps
        every = max(1, steps // max(frames - 1, 1)) if frames > 0 else None
        result = sample(network, self.diffusion, self.shape, noise, config, kwargs, record_x0_every=every)
        if result.pred_x0 is None:
            return to_uint8(self.to_images(result.samples))
        chosen = result.pred_x0[np.linspace(0, len(result.pred_x0) - 1, frames).round().astype(int)]  # [F, n, C, H, W]
        return to_uint8(self.to_images(chosen.transpose(0, 1).flatten(0, 1)))  # [n * F, H, W, C], image after image

    def autoguided(self, weight: Any) -> Any:
        """The network as sampled: guided by the snapshot's autoguidance guide at its weight, or at ``weight`` (1: the
        model alone; a model stored without a guide takes no weight)."""
        guide = self.snapshot.guide
        if weight is None or (guide is not None and float(weight) == guide.weight):
            return self.model
        if guide is None:
            raise ValueError("autoguidance_weight: this model was registered without an autoguidance guide")
        if not float(weight) >= 1:
            raise ValueError(f"autoguidance_weight must be >= 1 (1: unguided), got {weight!r}")
        return self.snapshot.sampling_model(weight=float(weight))

    def guided(self, network: Any, model_input: pd.DataFrame, guidance_scale: float) -> tuple[Any, Any]:
        """The classifier-free guided ``network`` and the labels ``[n]`` of a conditional model's request, checked."""
        import torch

        from ddpm_core.samplers import limited_classifier_free_guidance

        num_classes = self.num_classes or 0
        labels = torch.as_tensor([int(label) for label in model_input["label"]], dtype=torch.long)  # [n]
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ValueError(f"label: classes of this model are 0..{num_classes - 1}, got {labels.tolist()}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (0: no guidance), got {guidance_scale}")
        abar = self.diffusion.alphas_cumprod  # [T]
        guided = limited_classifier_free_guidance(
            network, guidance_scale, num_classes, self.shape[0], abar, self.guidance_interval
        )
        return guided, labels


mlflow.models.set_model(DDPMSampler())
