"""Pieces that several family configs share."""

import torch


class LogitsOnly(torch.nn.Module):
    """Wraps a transformers model so that the traced graph takes pixel_values and returns the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def image_inputs(model, sizes, generator):
    """A batch of random images [batch, channels, height, width] for a vision model."""
    shape = (sizes["batch"], model.config.num_channels, sizes["height"], sizes["width"])
    return {"pixel_values": torch.randn(shape, generator=generator)}
