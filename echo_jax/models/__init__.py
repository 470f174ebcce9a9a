"""Echo models: ViT encoder, JEPA predictor, RWSE layer mixing."""

from echo_jax.models.rwse import RWSE
from echo_jax.models.vit import Encoder, Predictor, sincos_1d

__all__ = ["Encoder", "Predictor", "RWSE", "sincos_1d"]
