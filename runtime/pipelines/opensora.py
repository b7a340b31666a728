"""Open-Sora 1.2 as our eager reference (``dit.opensora_pipeline``) runs it: T5 with the
aesthetic suffix, the learned null caption, rectified flow, our OpenSoraVAE."""

from __future__ import annotations

import json

import torch

from ..aoti import CompiledVaeDecoder
from ..errors import ShapeError
from ..manifest import Manifest
from .base import PipelineParts, Sampler, component_errors


class OpenSoraSampler(Sampler):
    """Open-Sora 1.2's rectified-flow loop (``dit.rflow.RFlowSampler``): the CFG batch is
    ``[conditional, unconditional]``, the model's first 4 output channels are the velocity, one
    Euler step per timestep. fps and the pixel size are stem inputs, as the release passes them."""

    def __init__(self, parts, rflow, latents, timesteps, frames, height, width, guidance_scale):
        self.parts, self.rflow, self.latents, self.timesteps = parts, rflow, latents, timesteps
        self.guidance_scale = self.guidance_scale_2 = guidance_scale
        self.experts = self.expert_schedule()
        self.extras = {"fps": float(parts.config["fps"]), "height": float(height), "width": float(width)}

    def fill(self, stem_in: dict, latents: torch.Tensor, i: int) -> None:
        cfg = self.guidance_scale is not None
        stem_in["latents"].copy_(torch.cat([latents, latents]) if cfg else latents)
        stem_in["timestep"].copy_(torch.cat([self.timesteps[i]] * 2) if cfg else self.timesteps[i])
        for name, value in self.extras.items():
            stem_in[name].fill_(value)

    def step(self, noise_pred: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        return self.rflow.step(noise_pred, i, latents, self.timesteps, guidance=self.guidance_scale is not None)


class OpenSoraPipelineParts(PipelineParts):
    """Open-Sora 1.2: T5 with the aesthetic-score suffix, padded to the model's caption length
    with its mask; CFG against the model's learned null caption (``y_embedding``, exported next
    to the engines); rectified flow with the resolution/frames timestep transform; our
    OpenSoraVAE (spatial SDXL VAE + temporal causal VAE, 17-frame micro chunks)."""

    type = "opensora"

    def __init__(self, manifest: Manifest, device: torch.device, components: dict | None = None):
        self.config = manifest.pipeline
        self.device = device
        if components is not None:
            self.tokenizer, self.vae = components["tokenizer"], components["vae"].eval().to(device)
            self.text_encoder = components["text_encoder"].eval().to(device)
            self.rflow_config = dict(components["scheduler"])
            self.null_caption = components["null_caption"].to(device)
        else:
            self._load(manifest, device)

    def _load(self, manifest: Manifest, device):
        import transformers
        from safetensors.torch import load_file

        from dit.opensora_vae import load_opensora_vae

        transformers.utils.logging.disable_progress_bar()
        with component_errors(manifest):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(manifest.component("tokenizer"),
                                                                        local_files_only=True)
            self.text_encoder = transformers.T5EncoderModel.from_pretrained(
                manifest.component("text_encoder"), local_files_only=True).eval().to(device)
            self.vae = load_opensora_vae(manifest.component("vae")).eval().to(device)
            self.rflow_config = json.loads((manifest.component("scheduler") / "scheduler_config.json").read_text())
            self.null_caption = load_file(str(manifest.component("null_caption")))["y_embedding"].to(device)

    def enable_vae_tiling(self) -> None:
        raise ShapeError("--vae-tiling is not available for Open-Sora: its VAE already decodes 17-frame chunks, "
                         "frame by frame in the spatial stage")

    def compiled_vae(self, component):
        return CompiledOpenSoraVae(component, self.vae)

    def latent_frames(self, frames: int) -> int:
        if frames < self.config["micro_frame_size"]:
            raise ShapeError(f"frames={frames}: Open-Sora 1.2 makes videos of at least {self.config['micro_frame_size']} "
                             f"frames (its timestep transform needs one full VAE chunk); pass --frames 17 or more")
        return self.vae.latent_frames(frames)  # the loaded VAE's own chunking rule

    @staticmethod
    def text_tokens(cond: dict[str, torch.Tensor]) -> int:
        return cond["caption"].shape[1]

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str | None, guidance: bool) -> dict[str, torch.Tensor]:
        """``{"caption": (2 or 1, T, C), "caption_mask": (2 or 1, T)}``: the prompt with the aesthetic
        suffix, then (with guidance) the null caption under the same mask."""
        if negative_prompt:
            raise ShapeError("Open-Sora 1.2 guides against its learned null caption: --negative-prompt is not "
                             "supported for this model")
        from dit.opensora_pipeline import append_score

        text = append_score(prompt, self.config.get("aesthetic_score"))
        max_length = self.config["max_text_length"]
        self._warn_truncation(text, max_length)
        embeds, mask = self._encode([text], max_length)
        mask = mask.float()
        if not guidance:
            return {"caption": embeds, "caption_mask": mask}
        null = self.null_caption[None, :embeds.shape[1]].to(embeds.dtype)
        return {"caption": torch.cat([embeds, null]), "caption_mask": torch.cat([mask, mask])}

    def sampler(self, steps: int, frames: int, height: int, width: int, seed: int, guidance_scale: float | None,
                dtype: torch.dtype = torch.float32, guidance_scale_2: float | None = None) -> OpenSoraSampler:
        from dit.rflow import RFlowSampler

        rflow = RFlowSampler(num_steps=steps, guidance_scale=guidance_scale or 1.0,
                             use_timestep_transform=self.rflow_config.get("use_timestep_transform", True),
                             num_timesteps=self.rflow_config.get("num_timesteps", 1000))
        size = [torch.tensor([float(v)]) for v in (height, width, frames)]
        timesteps = [t.to(self.device) for t in rflow.timesteps(*size)]
        f = self.config["vae_scale_factor"]
        shape = (1, self.config["latent_channels"], self.latent_frames(frames), height // f, width // f)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        return OpenSoraSampler(self, rflow, latents, timesteps, frames, height, width, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames: int | None = None):
        """Latents ``(1, 4, F', h, w)`` -> uint8 ``(frames, H, W, 3)``, rounded as the release's
        ``save_sample``: clamp to [-1, 1], to [0, 1], ``* 255 + 0.5``, truncate."""
        from dit.opensora_pipeline import to_frames

        return to_frames(self.vae.decode(latents.float(), frames))


class CompiledOpenSoraVae(CompiledVaeDecoder):
    """``vae.decode(latents, num_frames)`` with the compiled decoder, built for the default video's frames."""

    def decode(self, latents, num_frames):
        self.check(latents)
        want = self.component.entry["outputs"][0]["shape"][2]
        if num_frames != want:
            raise ShapeError(f"the compiled VAE decoder makes {want} frames (the default video), not {num_frames}: "
                             f"pass --frames {want}, or run without --compiled-components")
        return self.component(latents.contiguous())
